"""SICSRec's settings: the YAML defaults, which modalities a run uses and the feature names it reads.

Every default lives in ``properties/model/SICSRec.yaml`` (run-wide keys such as ``seed``: RecBole's and
the plugin's ``overall.yaml``). A full :class:`~recbole_mm.config.MMConfig` already holds them all; the
stage-1 functions also take a plain dict of a few settings (``stage1_feature_names({"sft_seed": None,
"seed": 2021})``), and :func:`setting` reads what such a dict leaves out from those files, so no
default is repeated in code.
"""

from __future__ import annotations

import functools
import importlib.util
import os

MODALITIES = {"text": ["text"], "image": ["image"], "both": ["text", "image"]}


@functools.lru_cache(maxsize=None)
def defaults():
    """key -> default of a SICSRec run before any dataset or user file: RecBole's ``overall.yaml``, the
    plugin's ``properties/overall.yaml``, then ``properties/model/SICSRec.yaml`` (MMConfig's order, later
    files win); read once per process."""
    import yaml

    from recbole_mm.config import properties_dir

    recbole = importlib.util.find_spec("recbole")
    files = [os.path.join(properties_dir(), "overall.yaml"), os.path.join(properties_dir(), "model", "SICSRec.yaml")]
    if recbole is not None and recbole.submodule_search_locations:
        files.insert(0, os.path.join(list(recbole.submodule_search_locations)[0], "properties", "overall.yaml"))
    out = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            out.update(yaml.safe_load(f) or {})
    return out


def setting(config, key, keep_none=False):
    """``config[key]``; its YAML default (:func:`defaults`) where ``config`` lacks the key or sets it to
    ``~``. ``keep_none``: ``~`` is a value of its own (``sft_seed: ~`` = the run's seed, ``sft_cache_mb: ~``
    = no bound) and only a missing key takes the default."""
    value = config[key] if key in config else defaults().get(key)
    return defaults().get(key) if value is None and not keep_none else value


def modalities(config):
    modality = setting(config, "content_modality")
    if modality not in MODALITIES:
        raise ValueError(f"content_modality must be one of {tuple(MODALITIES)}, got {modality!r}")
    return MODALITIES[modality]


def base_feature_names(config):
    """modality -> feature-store name of the raw (not aligned) features."""
    return {m: setting(config, f"{m}_feature") for m in modalities(config)}


def sft_seed(config):
    """Seed of stage 1: ``sft_seed``, or the run's ``seed`` when ``sft_seed`` is ``~``."""
    value = setting(config, "sft_seed", keep_none=True)
    return int(setting(config, "seed") if value is None else value)


def stage1_feature_names(config):
    """modality -> feature-store name of the stage-1 (aligned) features.

    With a fixed ``sft_seed`` (default) stage 1 is per-dataset preprocessing: one table per
    modality, shared by every run and seed. With ``sft_seed: ~`` each run seed fine-tunes its own
    and the names get a ``_seed<N>`` suffix, so parallel or successive seeds never overwrite (or
    rebuild) each other's tables.
    """
    suffix = f"_seed{sft_seed(config)}" if setting(config, "sft_seed", keep_none=True) is None else ""
    return {m: setting(config, f"stage1_{m}_feature") + suffix for m in modalities(config)}
