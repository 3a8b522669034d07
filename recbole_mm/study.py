"""YAML studies: datasets x models x seeds, one fresh subprocess per cell, resumable, with tables.

A study YAML (see ``docs/STUDIES.md`` and ``properties/study/``) names datasets, models (plugin
or RecBole, or variants of them with their own config), seeds, shared and per-model / per-dataset
config overrides, the metrics to report and an output folder. Each cell (dataset, model, seed; with a
``sparsity:`` list also the fraction of the training data kept, ``sparsity_keep``) is one
``recbole_mm.quick_start.run_recbole_mm(..., saved=True)`` run in its own Python process, with
``record_path`` pointing at the cell's record in the study folder; the runner writes that JSON
atomically on success (``.failed.json`` on failure).

Resuming: a cell is finished iff its record exists and is complete; finished cells are never
run again and their records are never written. Killing the study (or a cell) at any point
loses at most the running cell. A finished cell whose configuration has changed since is an
error (before any training), never a silent mix of configurations.

Outputs in the study folder: ``cells.csv``, ``cells.json``, ``tables/<dataset>.md`` (mean ± std
over seeds with 95% t confidence intervals, best in bold, relative improvement of each proposed
model over the best baseline with a paired t-test across seeds, p-values adjusted for multiple
comparisons over the whole report: ``p_adjust``, :func:`holm`, :func:`benjamini_hochberg`; test
metrics per slice of the test users from the records' ``test_slices``: :func:`slices_table`),
``results.md`` (all tables, machine, wall time per cell) and ``plots/<dataset>_metrics.png`` /
``plots/<dataset>_valid.png``. With the sparsity axis: each dataset's tables and plots once per
level (``plots/<dataset>_keep<level>_*.png``) after a table of accuracy vs sparsity per model
(:func:`sparsity_table`) and ``plots/<dataset>_sparsity.png``.

Entry points: :func:`run_study`, ``python run_recbole_mm.py --study <file.yaml>`` (:func:`main`).
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import yaml

from recbole_mm.atomic import write_text_atomic
from recbole_mm.records import dead_run
from recbole_mm.validate import known_keys, suggest, value_problems

try:  # POSIX only: cell and study locks
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["run_study", "load_study", "validate_study", "main", "StudyError"]

# Plugin models that are baselines (RecBole models are always baselines).

STUDY_KEYS = {
    "name": "study name (default: the YAML file name)",
    "description": "free text, copied into results.md",
    "output_dir": "study folder (default: studies/<name>, relative to the working directory)",
    "datasets": "list of dataset names",
    "models": "list of model names (plugin or RecBole) or variants {name, model, config, role}",
    "seeds": "list of integer seeds (default: [2020])",
    "sparsity": "list of fractions of the training data kept (sparsity_keep), a cell axis like seeds, e.g. "
                "[1.0, 0.5, 0.25] (default: none; every cell trains on all of it)",
    "metrics": "RecBole metrics for every cell, e.g. [Hit, NDCG]",
    "topk": "RecBole cut-offs for every cell, e.g. [5, 10]",
    "report": "metrics shown in the tables, e.g. [hit@10, ndcg@10] (default: metrics x topk)",
    "proposed": "models compared against the best baseline (default: the models whose spec says role: proposed)",
    "config": "config overrides for every cell",
    "config_files": "RecBole YAML files for every cell",
    "dataset_config": "per-dataset overrides: {dataset: {key: value}}",
    "model_config": "per-model overrides: {model: {key: value}}",
    "sources": "how to build datasets that are not there: {dataset: {type: ninerec, path: ...}}",
    "keep_checkpoints": "keep each cell's best checkpoint (default: true)",
    "cell_timeout_s": "kill a cell after this many seconds (default: none)",
    "strict_keys": "unknown config keys are errors (default: true); false: warnings",
    "p_adjust": "multiple-comparison correction of the report's p-values: holm (default), bh or none",
}
# p_adjust values (study key): the multiple-comparison correction of a report's p-values
P_ADJUST_METHODS = {"holm": "Holm's step-down method, family-wise error rate",
                    "bh": "Benjamini-Hochberg, false discovery rate",
                    "none": "raw p-values only"}
# Keys the study sets for every cell itself.
RESERVED_CONFIG_KEYS = {
    "model": "list models under 'models:'",
    "dataset": "list datasets under 'datasets:'",
    "seed": "list seeds under 'seeds:'",
    "record_path": "the study sets each cell's record path",
    "record_runs": "a study needs the run records",
}
# Config keys RecBole reads without having defaults for them.
EXTRA_CONFIG_KEYS = {"mm_feature_names", "nproc", "world_size", "offset", "ip", "port"}
VARIANT_KEYS = {
    "name": "the variant's label: cell folders, tables, CSV, plots",
    "model": "the model class it runs (plugin or RecBole)",
    "config": "config overrides of the variant, over the study's config and model_config",
    "role": "baseline or proposed (default: the role of its model)",
}
SOURCE_TYPES = {
    "ninerec": {"required": (), "optional": ("path", "benchmark", "max_history")},
    "movielens": {"required": ("path",), "optional": ()},
    "amazon": {"required": ("reviews", "meta"), "optional": ("kcore", "image_dir")},
}
NINEREC_ENV = "RECBOLE_MM_NINEREC_DIR"
CELL_LOCK_WAIT_S = 60
EXIT_BUSY = 75
EXIT_DEFAULTS_CHANGED = 76  # a cell refused to start: its defaults or config files changed since the study started
# a cell process ended by SIGINT or SIGTERM (Popen's negative codes, or a shell's 128 + n) was interrupted,
# not failed: it reruns on the next start, and no further cell starts after it
INTERRUPTED_CODES = {-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM}
METRIC_NAMES = {"hit": "HR", "ndcg": "NDCG", "mrr": "MRR", "recall": "Recall", "precision": "Precision",
                "map": "MAP", "auc": "AUC", "gauc": "GAUC", "logloss": "LogLoss"}


class StudyError(ValueError):
    """An invalid study (message names the YAML line) or a study that cannot run."""


# ============================================================================ YAML with lines


class _LineDict(dict):
    """A mapping that remembers the line of each key (``key_lines``) and its own ``line``."""

    line = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key_lines = {}


class _LineList(list):
    """A sequence that remembers the line of each item (``item_lines``)."""

    line = None

    def __init__(self, *args):
        super().__init__(*args)
        self.item_lines = []


class _LineLoader(yaml.SafeLoader):
    """SafeLoader recording ``node.start_mark.line + 1`` for mapping keys and list items,
    refusing duplicate keys, and reading ``1e-4`` as a float (as RecBole's loader does)."""


def _construct_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark) from None
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {out.key_lines[key]})",
                key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader, node, deep=False):
    out = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _plain(obj):
    """Plain dicts and lists (the line-tracking containers stripped)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _parse_value(text):
    """A command-line value as YAML (``1`` -> 1, ``[5,10]`` -> list, ``1e-4`` -> float)."""
    try:
        return _plain(yaml.load(text, Loader=_LineLoader))
    except yaml.YAMLError:
        return text


def load_study(path):
    """Read a study YAML keeping line numbers; returns the mapping (a dict subclass)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_LineLoader)
    except FileNotFoundError:
        raise StudyError(f"{path}: study file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise StudyError(f"{path}{line}: YAML error: {problem}") from None
    if data is None:
        raise StudyError(f"{path}:1: the study file is empty")
    if not isinstance(data, dict):
        raise StudyError(f"{path}:1: a study must be a mapping (datasets:, models:, seeds:, ...)")
    return data


# ============================================================================ validation


class _Errors:
    def __init__(self, source):
        self.source = source
        self.items = []
        self.warnings = []

    def _where(self, line, path):
        loc = self.source + (f":{line}" if line else "")
        return f"{loc}: {path}: " if path else f"{loc}: "

    def add(self, line, path, message):
        self.items.append((line or 0, len(self.items), self._where(line, path) + message))

    def warn(self, line, path, message):
        self.warnings.append(self._where(line, path) + message)

    def raise_if_any(self):
        if self.items:
            head = f"invalid study ({len(self.items)} problem{'s' if len(self.items) > 1 else ''}):"
            raise StudyError("\n".join([head] + [f"  {m}" for _, _, m in sorted(self.items)]))


def _key_line(mapping, key):
    return getattr(mapping, "key_lines", {}).get(key) or getattr(mapping, "line", None)


def _item_line(seq, index):
    lines = getattr(seq, "item_lines", [])
    return lines[index] if index < len(lines) else getattr(seq, "line", None)


_suggest = suggest  # the validator's "did you mean", shared with single runs and tune


@contextlib.contextmanager
def _config_env():
    """Build RecBole configs in this process without its side effects leaking: a clean
    ``sys.argv`` (RecBole reads --key=value from it) and ``CUDA_VISIBLE_DEVICES`` restored."""
    argv = sys.argv
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    sys.argv = [argv[0] if argv else "recbole_mm"]
    try:
        yield
    finally:
        sys.argv = argv
        if cuda is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_ninerec_path(dataset):
    """Where a NineRec dataset is looked for when its source names no path:
    ``$RECBOLE_MM_NINEREC_DIR/<name>``, else ``<repo>/../shared/data/ninerec_bili/<name>``
    (then the same relative to the working directory)."""
    env = os.environ.get(NINEREC_ENV)
    if env:
        return os.path.abspath(os.path.join(env, dataset))
    candidates = [
        os.path.join(_repo_root(), "..", "shared", "data", "ninerec_bili", dataset),
        os.path.join(os.getcwd(), "..", "shared", "data", "ninerec_bili", dataset),
    ]
    for cand in candidates:
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    return os.path.abspath(candidates[0])


def default_source(dataset):
    """The source of a dataset without a ``sources:`` entry: NineRec for ``Bili_*`` names, else None."""
    if not dataset.startswith("Bili_"):
        return None
    return {"type": "ninerec", "path": default_ninerec_path(dataset)}


def _dataset_present(data_dir, dataset, benchmark):
    if benchmark:
        return all(os.path.isfile(os.path.join(data_dir, f"{dataset}.{part}.inter")) for part in benchmark)
    return os.path.isfile(os.path.join(data_dir, f"{dataset}.inter"))


def _bad_name(v):
    """Not a usable name for a dataset, model or variant (they name folders)."""
    return not isinstance(v, str) or not v or "/" in v or "\\" in v or v in (".", "..")


def _model_role(model, proposed):
    return "proposed" if model in proposed else "baseline"


class Study:
    """A validated study: its cells, paths and per-cell configuration."""

    def __init__(self, spec, source="<dict>", output_dir=None, overrides=None):
        self.raw = spec
        self.source = source
        self.overrides = dict(overrides or {})
        self.errors = _Errors(source)
        self.defaults = {}  # (dataset, model) -> default config values, snapshotted at validation
        self._validate(output_dir)

    # ------------------------------------------------------------------ validation
    def _validate(self, output_dir):
        from recbole_mm.registry import get_model

        raw, err = self.raw, self.errors
        if not isinstance(raw, dict):
            raise StudyError(f"{self.source}: a study must be a mapping")
        for key in raw:
            if key not in STUDY_KEYS:
                err.add(_key_line(raw, key), "", f"unknown key {key!r}{_suggest(key, STUDY_KEYS)}; "
                        f"known keys: {', '.join(STUDY_KEYS)}")

        name = raw.get("name")
        if name is None:
            name = os.path.splitext(os.path.basename(self.source))[0] if self.source != "<dict>" else "study"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            err.add(_key_line(raw, "name"), "name", f"must be a simple name (letters, digits, _.-), got {name!r}")
            name = "study"
        self.name = name
        self.description = raw.get("description") or ""
        out = output_dir or raw.get("output_dir") or os.path.join("studies", name)
        if not isinstance(out, str):
            err.add(_key_line(raw, "output_dir"), "output_dir", f"must be a path, got {out!r}")
            out = os.path.join("studies", name)
        self.output_dir = os.path.abspath(out)

        self.datasets = self._name_list("datasets", required=True)
        models = self._name_list("models", required=True, variants=True)
        # self.models: the cells' labels (a model's name, or a variant's); self.variants: label -> variant
        self.models, self.variants, model_lines, aliases = [], {}, {}, {}

        def model_class(model, line, path):  # the model's class name, or None (error added)
            try:
                aliases[model] = get_model(model).__name__
            except Exception as exc:  # noqa: BLE001 - UnknownModelError or a model that fails to import
                err.add(line, path, str(exc) if "nknown model" in str(exc)
                        else f"model {model!r} cannot be loaded: {type(exc).__name__}: {exc}")
            return aliases.get(model)

        for i, entry in enumerate(models):
            line = _item_line(raw.get("models"), i)
            variant = self._variant(entry, f"models[{i}]", line) if isinstance(entry, dict) else None
            if isinstance(entry, dict) and variant is None:
                continue
            if variant is None:
                label = model_class(entry, line, f"models[{i}]")
            else:
                variant["model"] = model_class(variant["model"], _key_line(entry, "model"), f"models[{i}].model")
                label = variant["name"] if variant["model"] else None
            if label is None:
                continue
            if label in self.models:
                err.add(line, f"models[{i}]", f"model {label!r} is listed twice")
                continue
            self.models.append(label)
            model_lines[label] = line
            if variant is not None:
                self.variants[label] = variant
        self._model_lines = model_lines
        aliases.update({m: m for m in self.models})

        seeds = raw.get("seeds", [2020])
        if not isinstance(seeds, list) or not seeds:
            err.add(_key_line(raw, "seeds"), "seeds", f"must be a non-empty list of integers, got {seeds!r}")
            seeds = []
        self.seeds = []
        for i, seed in enumerate(seeds):
            if isinstance(seed, bool) or not isinstance(seed, int):
                err.add(_item_line(seeds, i), f"seeds[{i}]", f"a seed must be an integer, got {seed!r}")
            elif seed in self.seeds:
                err.add(_item_line(seeds, i), f"seeds[{i}]", f"seed {seed} is listed twice")
            else:
                self.seeds.append(seed)
        self.sparsity = self._sparsity_levels()

        # proposed models (the rest are baselines); a variant has its model's role unless it gives one
        proposed = raw.get("proposed")
        roles = {m: v["role"] for m, v in self.variants.items() if v["role"]}
        listed = []
        if proposed is None:
            from recbole_mm.registry import proposed_models

            own = set(proposed_models())  # the models whose spec says role: proposed
            listed = [m for m in self.models + self.base_models() if m in own]
        elif not isinstance(proposed, list):
            err.add(_key_line(raw, "proposed"), "proposed", "must be a list of model names")
        else:
            for i, m in enumerate(proposed):
                canonical = aliases.get(m, m)
                if canonical not in self.models:
                    err.add(_item_line(proposed, i), f"proposed[{i}]",
                            f"{m!r} is not one of the study's models {self.models}")
                elif roles.get(canonical) == "baseline":
                    err.add(_item_line(proposed, i), f"proposed[{i}]", f"{m!r} is a variant with role: baseline")
                else:
                    listed.append(canonical)
        self.proposed = [m for m in listed if m in self.models] + [
            m for m in self.models if m not in listed and roles.get(m, "proposed" if self.model_of(m) in listed
                                                                    else "baseline") == "proposed"]

        # metrics
        self.metrics = raw.get("metrics")
        self.topk = raw.get("topk")
        self._validate_metrics()

        # overrides
        self.config = self._mapping("config")
        self.dataset_config = self._nested("dataset_config", self.datasets, {})
        self.model_config = self._nested("model_config", self.models + self.base_models(), aliases)
        self.config_files = []
        files = raw.get("config_files") or []
        if isinstance(files, str):
            files = files.split()
        if not isinstance(files, list):
            err.add(_key_line(raw, "config_files"), "config_files", "must be a list of YAML files")
            files = []
        for i, f in enumerate(files):
            path = os.path.abspath(str(f))
            if not os.path.isfile(path):
                err.add(_item_line(raw.get("config_files"), i), f"config_files[{i}]", f"file not found: {path}")
            self.config_files.append(path)
        for key in ("keep_checkpoints", "strict_keys"):
            if key in raw and not isinstance(raw[key], bool):
                err.add(_key_line(raw, key), key, f"must be true or false, got {raw[key]!r}")
        self.keep_checkpoints = raw.get("keep_checkpoints", True) is not False
        self.strict_keys = raw.get("strict_keys", True) is not False
        timeout = raw.get("cell_timeout_s")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            err.add(_key_line(raw, "cell_timeout_s"), "cell_timeout_s", f"must be a positive number, got {timeout!r}")
            timeout = None
        self.cell_timeout_s = timeout
        p_adjust = raw.get("p_adjust", "holm")
        if not isinstance(p_adjust, str) or p_adjust.lower() not in P_ADJUST_METHODS:
            err.add(_key_line(raw, "p_adjust"), "p_adjust", f"must be one of {', '.join(P_ADJUST_METHODS)} ("
                    + "; ".join(f"{k}: {v}" for k, v in P_ADJUST_METHODS.items())
                    + f"), got {p_adjust!r}{_suggest(str(p_adjust).lower(), P_ADJUST_METHODS)}")
            p_adjust = "holm"
        self.p_adjust = p_adjust.lower()
        self.sources = self._validate_sources()

        for path, mapping in self._override_maps():
            for key in mapping:
                if key in RESERVED_CONFIG_KEYS:
                    err.add(_key_line(mapping, key), f"{path}.{key}",
                            f"{key!r} cannot be overridden: {RESERVED_CONFIG_KEYS[key]}")
        for key in self.overrides:
            if key in RESERVED_CONFIG_KEYS:
                err.add(None, f"command line --{key}", f"cannot be overridden: {RESERVED_CONFIG_KEYS[key]}")
        if self.sparsity is not None:  # the axis sets sparsity_keep per cell
            for path, mapping in self._override_maps():
                if "sparsity_keep" in mapping:
                    err.add(_key_line(mapping, "sparsity_keep"), f"{path}.sparsity_keep",
                            "'sparsity_keep' is set per cell by the study's `sparsity:` list")
            if "sparsity_keep" in self.overrides:
                err.add(None, "command line --sparsity_keep", "set per cell by the study's `sparsity:` list")
        if self.metrics is not None and "metrics" in self.config:
            err.add(_key_line(self.config, "metrics"), "config.metrics", "metrics are given twice (top level and config)")
        if self.topk is not None and "topk" in self.config:
            err.add(_key_line(self.config, "topk"), "config.topk", "topk is given twice (top level and config)")

        # datasets and config keys need RecBole configs of valid models: checked whenever there are
        # some, so that one pass reports every problem it can
        if self.models and self.datasets:
            self._validate_config_keys_and_datasets()
        err.raise_if_any()
        if self.sparsity is None:
            self.cells = [(d, m, s) for d in self.datasets for m in self.models for s in self.seeds]
        else:  # (dataset, model, seed, level): a dataset's levels in the order given, all models at each
            self.cells = [(d, m, s, k) for d in self.datasets for k in self.sparsity for m in self.models
                          for s in self.seeds]

    def _sparsity_levels(self):
        """The ``sparsity:`` axis (fractions of the training data kept, as floats), or None."""
        raw, err = self.raw, self.errors
        levels = raw.get("sparsity")
        if levels is None:
            return None
        if not isinstance(levels, list) or not levels:
            err.add(_key_line(raw, "sparsity"), "sparsity", "must be a non-empty list of fractions of the training "
                    f"data kept, in (0, 1], e.g. [1.0, 0.5, 0.25]; got {levels!r}")
            return None
        out = []
        for i, k in enumerate(levels):
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
                err.add(_item_line(levels, i), f"sparsity[{i}]",
                        f"a level is the fraction of the training data kept, in (0, 1], got {k!r}")
            elif float(k) in out:
                err.add(_item_line(levels, i), f"sparsity[{i}]", f"level {k:g} is listed twice")
            else:
                out.append(float(k))
        return out

    def _name_list(self, key, required, variants=False):
        """The names listed under ``key`` (and, with ``variants``, its mapping entries as they are)."""
        raw, err = self.raw, self.errors
        value = raw.get(key)
        if value is None:
            if required:
                err.add(getattr(raw, "line", None), key, f"missing: the study needs a list of {key}")
            return []
        if isinstance(value, str):
            value = _LineList([value])
            value.item_lines = [_key_line(raw, key)]
        if not isinstance(value, list) or not value:
            err.add(_key_line(raw, key), key, f"must be a non-empty list of names, got {value!r}")
            return []
        names = []
        for i, v in enumerate(value):
            if variants and isinstance(v, dict):
                names.append(v)
            elif _bad_name(v):
                err.add(_item_line(value, i), f"{key}[{i}]", f"must be a name, got {v!r}")
            elif v in names:
                err.add(_item_line(value, i), f"{key}[{i}]", f"{v!r} is listed twice")
            else:
                names.append(v)
        if isinstance(raw.get(key), str):
            raw[key] = value
        return names

    def _variant(self, entry, path, line):
        """A ``models:`` entry ``{name, model, config, role}``: the variant (its model not looked up
        yet), or None when it is malformed (errors added)."""
        from recbole_mm.registry import get_model

        err, count = self.errors, len(self.errors.items)
        for key in entry:
            if key not in VARIANT_KEYS:
                err.add(_key_line(entry, key), f"{path}.{key}", f"unknown key for a model variant"
                        f"{_suggest(key, VARIANT_KEYS)}; known: {', '.join(VARIANT_KEYS)}")
        name, model, config, role = (entry.get(k) for k in VARIANT_KEYS)
        if _bad_name(name):
            err.add(_key_line(entry, "name"), f"{path}.name", f"a variant needs a name (no / or \\), got {name!r}")
        else:  # a model's name (any case) would be ambiguous in proposed and model_config
            with contextlib.suppress(Exception):
                err.add(_key_line(entry, "name"), f"{path}.name", f"{name!r} is the name of the model "
                        f"{get_model(name).__name__}: a variant needs a name of its own")
        if not isinstance(model, str) or not model:
            err.add(line, path, "a variant needs the model it runs, e.g. "
                    "{name: SASRec+bucketing, model: SASRec, config: {length_bucketing: True}}")
        config = _LineDict() if config is None else config
        if not isinstance(config, dict):
            err.add(_key_line(entry, "config"), f"{path}.config", f"must be a mapping of config keys, got {config!r}")
        if role not in (None, "baseline", "proposed"):
            err.add(_key_line(entry, "role"), f"{path}.role", f"must be baseline or proposed, got {role!r}")
        if len(err.items) > count:
            return None
        return {"name": name, "model": model, "config": config, "role": role, "path": path}

    def model_of(self, label):
        """The model class name a cell label runs (a variant's model, else the label itself)."""
        return self.variants[label]["model"] if label in self.variants else label

    def base_models(self):
        """The models of the study's variants that are not listed themselves."""
        return list(dict.fromkeys(v["model"] for v in self.variants.values() if v["model"] not in self.models))

    def _mapping(self, key):
        value = self.raw.get(key)
        if value is None:
            return _LineDict()
        if not isinstance(value, dict):
            self.errors.add(_key_line(self.raw, key), key, f"must be a mapping of config keys, got {value!r}")
            return _LineDict()
        return value

    def _nested(self, key, allowed, aliases):
        outer = self._mapping(key)
        result = {}
        for name, inner in outer.items():
            line = _key_line(outer, name)
            canonical = aliases.get(name, name) if aliases else name
            if canonical not in allowed:
                what = "models" if key == "model_config" else "datasets"
                self.errors.add(line, f"{key}.{name}", f"{name!r} is not one of the study's {what} "
                                f"{allowed}{_suggest(name, allowed)}")
                continue
            if inner is None:
                inner = _LineDict()
            if not isinstance(inner, dict):
                self.errors.add(line, f"{key}.{name}", f"must be a mapping of config keys, got {inner!r}")
                continue
            result[canonical] = inner
        return result

    def _override_maps(self):
        yield "config", self.config
        for d, m in self.dataset_config.items():
            yield f"dataset_config.{d}", m
        for name, m in self.model_config.items():
            yield f"model_config.{name}", m
        for v in self.variants.values():
            yield f"{v['path']}.config", v["config"]

    def _validate_metrics(self):
        raw, err = self.raw, self.errors
        from recbole.evaluator.register import metrics_dict

        if self.metrics is not None:
            if isinstance(self.metrics, str):
                self.metrics = [self.metrics]
            if not isinstance(self.metrics, list) or not self.metrics:
                err.add(_key_line(raw, "metrics"), "metrics", "must be a non-empty list, e.g. [Hit, NDCG]")
                self.metrics = None
            else:
                for i, m in enumerate(self.metrics):
                    if not isinstance(m, str) or m.lower() not in metrics_dict:
                        err.add(_item_line(raw["metrics"], i), f"metrics[{i}]", f"unknown RecBole metric {m!r}"
                                f"{_suggest(str(m).lower(), metrics_dict)}; known: {', '.join(sorted(metrics_dict))}")
        if self.topk is not None:
            if isinstance(self.topk, int) and not isinstance(self.topk, bool):
                self.topk = [self.topk]
            if not isinstance(self.topk, list) or not self.topk or not all(
                    isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in self.topk):
                err.add(_key_line(raw, "topk"), "topk", f"must be a list of positive integers, got {self.topk!r}")
                self.topk = None
        report = raw.get("report")
        self.report = None
        if report is not None:
            if not isinstance(report, list) or not report:
                err.add(_key_line(raw, "report"), "report", "must be a non-empty list like [hit@10, ndcg@10]")
            else:
                self.report = []
                for i, r in enumerate(report):
                    name = str(r).lower()
                    base = name.split("@")[0]
                    if base not in metrics_dict or ("@" in name and not name.split("@", 1)[1].isdigit()):
                        err.add(_item_line(report, i), f"report[{i}]", f"{r!r} is not a metric like hit@10")
                    elif self.metrics and self.topk and name not in {
                            f"{m.lower()}@{k}" for m in self.metrics for k in self.topk}:
                        err.add(_item_line(report, i), f"report[{i}]", f"{r!r} is not computed: it is not among "
                                "metrics x topk")
                    else:
                        self.report.append(name)
        elif self.metrics and self.topk:
            self.report = [f"{m.lower()}@{k}" for m in self.metrics for k in self.topk]

    def _validate_sources(self):
        raw = self._mapping("sources")
        sources = {}
        for name, entry in raw.items():
            line = _key_line(raw, name)
            if name not in self.datasets:
                self.errors.add(line, f"sources.{name}", f"{name!r} is not one of the study's datasets "
                                f"{self.datasets}{_suggest(name, self.datasets)}")
                continue
            if not isinstance(entry, dict) or "type" not in entry:
                self.errors.add(line, f"sources.{name}", "must be a mapping with a type "
                                f"({', '.join(SOURCE_TYPES)}), e.g. {{type: ninerec, path: raw/{name}}}")
                continue
            kind = entry["type"]
            if kind not in SOURCE_TYPES:
                self.errors.add(_key_line(entry, "type"), f"sources.{name}.type",
                                f"unknown source type {kind!r}; known: {', '.join(SOURCE_TYPES)}")
                continue
            allowed = {"type"} | set(SOURCE_TYPES[kind]["required"]) | set(SOURCE_TYPES[kind]["optional"])
            for key in entry:
                if key not in allowed:
                    self.errors.add(_key_line(entry, key), f"sources.{name}.{key}",
                                    f"unknown key for a {kind} source{_suggest(key, allowed)}; known: {sorted(allowed)}")
            for key in SOURCE_TYPES[kind]["required"]:
                if key not in entry:
                    self.errors.add(line, f"sources.{name}", f"a {kind} source needs {key!r}")
            resolved = {k: (os.path.abspath(str(v)) if k in ("path", "reviews", "meta", "image_dir") else v)
                        for k, v in entry.items()}
            if kind == "ninerec" and "path" not in resolved:
                resolved["path"] = default_ninerec_path(name)
            resolved["_line"] = line
            sources[name] = resolved
        return sources

    # ------------------------------------------------------------------ per-cell config
    def cell_overrides(self, dataset, model):
        """The user's config for one cell, lowest priority first (no study-forced keys)."""
        cfg = {"show_progress": False}
        cfg.update(_plain(self.config))
        if self.metrics is not None:
            cfg["metrics"] = list(self.metrics)
        if self.topk is not None:
            cfg["topk"] = list(self.topk)
        cfg.update(_plain(self.dataset_config.get(dataset, {})))
        for key in dict.fromkeys((self.model_of(model), model)):  # a variant: its model's entry, then its own
            cfg.update(_plain(self.model_config.get(key, {})))
        if model in self.variants:
            cfg.update(_plain(self.variants[model]["config"]))
        cfg.update(self.overrides)
        return cfg

    def _build_config(self, model, dataset, config_dict, files=True):
        return _build_mmconfig(model, dataset, config_dict, (self.config_files or None) if files else None)

    def _validate_config_keys_and_datasets(self):
        err = self.errors
        # 1. where each dataset lives, and whether it is there or can be built
        self.data_dirs, self.to_build = {}, {}
        datasets_list = self.raw.get("datasets")
        for i, d in enumerate(self.datasets):
            line = _item_line(datasets_list, i) if isinstance(datasets_list, list) else None
            overrides = {k: v for k, v in self.cell_overrides(d, self.models[0]).items()
                         if k not in RESERVED_CONFIG_KEYS}
            if "data_path" in overrides:
                overrides["data_path"] = os.path.abspath(str(overrides["data_path"]))
            try:
                cfg = self._build_config(self.model_of(self.models[0]), d, overrides)
            except Exception as exc:  # noqa: BLE001
                err.add(line, f"datasets[{i}]", f"RecBole cannot configure dataset {d!r}: {type(exc).__name__}: {exc}")
                continue
            data_dir = os.path.abspath(os.path.normpath(cfg["data_path"]))
            self.data_dirs[d] = data_dir
            benchmark = cfg["benchmark_filename"]
            if _dataset_present(data_dir, d, benchmark):
                continue
            source = self.sources.get(d) or default_source(d)
            if source is None:
                err.add(line, f"datasets[{i}]", f"dataset {d!r} not found: no {d}.inter in {data_dir} and no "
                        f"source to build it from (add sources: {{{d}: {{type: ninerec|movielens|amazon, ...}}}}, "
                        "or set data_path)")
                continue
            src_line = source.get("_line", line)
            paths = [source[k] for k in ("path", "reviews", "meta") if k in source]
            absent = [p for p in paths if not os.path.exists(p)]
            if absent:
                hint = f" (set {NINEREC_ENV} or the source's path)" if source["type"] == "ninerec" else ""
                err.add(src_line, f"datasets[{i}]" if d not in self.sources else f"sources.{d}",
                        f"dataset {d!r} not found in {data_dir} and its {source['type']} source is missing: "
                        f"{', '.join(absent or paths)}{hint}")
                continue
            if benchmark and source["type"] != "ninerec":
                err.add(line, f"datasets[{i}]", f"benchmark files {benchmark} can only be built by a ninerec source")
                continue
            self.to_build[d] = source
        if len(self.data_dirs) < len(self.datasets):
            return

        # 2. config keys: each must be known to RecBole or the plugin for some cell it applies to;
        # each cell's defaults (RecBole's and the plugin's YAML files) are snapshotted on the way
        known = {}  # (dataset, model) -> keys RecBole and the plugin know for that cell
        for d in self.datasets:
            for m in self.models:
                try:
                    cfg = self._build_config(self.model_of(m), d, {"data_path": os.path.dirname(self.data_dirs[d])},
                                             files=False)
                except Exception as exc:  # noqa: BLE001
                    err.add(self._model_lines.get(m), f"models ({m} on {d})",
                            f"RecBole cannot configure {m} on {d}: {type(exc).__name__}: {exc}")
                    return
                known[d, m] = known_keys(cfg) | EXTRA_CONFIG_KEYS  # the validator single runs use
                self.defaults[d, m] = config_defaults(cfg)
        all_keys = set().union(*known.values()) if known else set()

        def check_values(path, mapping, cells):
            # each value against the defaults of every cell it applies to (a key's type is per model)
            seen = set()
            for cell in cells:
                for key, message in value_problems(self.defaults.get(cell) or {}, mapping):
                    if key not in seen:
                        seen.add(key)
                        err.add(_key_line(mapping, key), f"{path}.{key}", message)

        def check(path, mapping, keys, cells):
            check_values(path, mapping, cells)
            for key in mapping:
                if key in keys or key in RESERVED_CONFIG_KEYS:
                    continue
                message = (f"unknown config key {key!r}{_suggest(key, keys)}: no RecBole or recbole_mm "
                           "default, model or dataset file defines it (set strict_keys: false to allow it)")
                (err.add if self.strict_keys else err.warn)(_key_line(mapping, key), f"{path}.{key}", message)

        check("config", self.config, all_keys, list(known))
        for d, mapping in self.dataset_config.items():
            check(f"dataset_config.{d}", mapping, set().union(*(known[d, m] for m in self.models)),
                  [(d, m) for m in self.models])
        for key, mapping in self.model_config.items():  # a model's entry applies to its variants too
            cells = [(d, m) for d in self.datasets for m in self.models if key in (m, self.model_of(m))]
            check(f"model_config.{key}", mapping, set().union(*(known[c] for c in cells)), cells)
        for m, v in self.variants.items():
            check(f"{v['path']}.config", v["config"], set().union(*(known[d, m] for d in self.datasets)),
                  [(d, m) for d in self.datasets])
        seen = set()
        for cell in known:
            for key, message in value_problems(self.defaults.get(cell) or {}, self.overrides):
                if key not in seen:
                    seen.add(key)
                    err.add(None, f"command line --{key}", message)
        for key in self.overrides:
            if key not in all_keys and key not in RESERVED_CONFIG_KEYS:
                (err.add if self.strict_keys else err.warn)(
                    None, f"command line --{key}", f"unknown config key{_suggest(key, all_keys)}")

    # ------------------------------------------------------------------ paths
    def cell_dir(self, dataset, model):
        return os.path.join(self.output_dir, "records", dataset, model)

    def cell_paths(self, dataset, model, seed, sparsity=None):
        """A cell's files; with a sparsity level (the study's ``sparsity:`` axis) in a ``keep<level>``
        folder below the model's."""
        level = [] if sparsity is None else [level_name(sparsity)]
        base = os.path.join(self.cell_dir(dataset, model), *level, f"seed{seed}")
        return {
            "record": base + ".json",
            "failed": base + ".failed.json",
            "cell": base + ".cell.json",
            "lock": base + ".lock",
            "log": os.path.join(self.output_dir, "logs", dataset, model, *level, f"seed{seed}.log"),
        }

    def finished_record(self, dataset, model, seed, sparsity=None):
        """The complete record of a finished cell, else None."""
        return complete_record(self.cell_paths(dataset, model, seed, sparsity)["record"], dataset,
                               self.model_of(model), seed, sparsity)

    def cell_spec(self, dataset, model, seed, sparsity=None):
        """Everything one cell (``model``: its label) needs; ``fingerprint`` identifies its configuration."""
        paths = self.cell_paths(dataset, model, seed, sparsity)
        config = self.cell_overrides(dataset, model)
        level = []
        if sparsity is not None:
            config["sparsity_keep"] = sparsity
            level = [level_name(sparsity)]
        config["data_path"] = os.path.dirname(self.data_dirs[dataset])
        if "checkpoint_dir" in config:
            config["checkpoint_dir"] = os.path.abspath(str(config["checkpoint_dir"]))
        ident = {"model": self.model_of(model), "dataset": dataset, "seed": seed, "config_dict": config,
                 "config_files": [[f, _file_sha(f)] for f in self.config_files]}
        fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
        forced = dict(config, seed=seed, record_path=paths["record"], record_runs=True)
        if not self.strict_keys:  # the study allowed unknown keys (with warnings): so does the cell's run
            forced["strict_config_keys"] = False
        # one folder per level: RecBole's saved dataloaders (save_dataloaders) do not check sparsity_keep
        forced.setdefault("checkpoint_dir", os.path.join(self.output_dir, "saved", dataset, model, *level))
        return {
            "model": self.model_of(model), "name": model, "dataset": dataset, "seed": seed,
            **({} if sparsity is None else {"sparsity": sparsity}),
            "config_files": list(self.config_files), "config_dict": forced,
            "user_config": config, "fingerprint": fingerprint,
            # what the cell's configuration also depends on, as of this study start: the default
            # values from RecBole's and the plugin's YAML files, and the config files' contents.
            # Kept out of the fingerprint so that cells finished before these were recorded stay valid.
            "defaults": self.defaults.get((dataset, model)),
            "config_file_shas": [[f, _file_sha(f)] for f in self.config_files],
            "keep_checkpoints": self.keep_checkpoints,
            # a folder the study's runs share (a run may publish there what another model reuses, e.g.
            # a SASRec cell as SICSRec's step 1: registry.ModelSpec.publishers); not for variants, whose
            # settings the publishers' keys may not cover
            "share_dir": (os.path.join(self.output_dir, "saved") if self.keep_checkpoints and model not in self.variants
                          else None),
            **paths,
        }


def level_name(sparsity):
    """A sparsity level in folder and file names: ``keep0.5``."""
    return f"keep{sparsity:g}"


def cell_text(dataset, model, seed, sparsity=None):
    """A cell in messages: ``Bili_Food / SASRec / seed 2020`` (``/ keep 0.5`` on the sparsity axis)."""
    return f"{dataset} / {model} / seed {seed}" + ("" if sparsity is None else f" / keep {sparsity:g}")


def _build_mmconfig(model, dataset, config_dict, config_files=None):
    from recbole_mm.config import MMConfig

    # the study checks its own keys and values (with its file's line numbers), below
    with _config_env():
        return MMConfig(model=model, dataset=dataset, config_file_list=config_files or None,
                        config_dict=config_dict, validate=False)


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def config_defaults(cfg):
    """A config's default values (RecBole's and the plugin's YAML files, before any user
    setting), as plain JSON values: what a cell's configuration depends on besides the study."""
    return _jsonable(cfg.internal_config_dict)


def _file_sha(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None


def validate_study(path_or_dict, output_dir=None, overrides=None):
    """Load and validate a study without running anything; returns the :class:`Study`."""
    if isinstance(path_or_dict, dict):
        return Study(path_or_dict, "<dict>", output_dir, overrides)
    path = os.fspath(path_or_dict)
    return Study(load_study(path), path, output_dir, overrides)


# ============================================================================ records


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def complete_record(path, dataset=None, model=None, seed=None, sparsity=None):
    """The record at ``path`` if it is a complete, finished run of that cell, else None."""
    rec = _read_json(path)
    if not isinstance(rec, dict) or rec.get("status") != "finished":
        return None
    if not isinstance(rec.get("test_result"), dict) or not rec["test_result"]:
        return None
    if not isinstance(rec.get("best_valid_result"), dict):
        return None
    for key, want in (("dataset", dataset), ("model", model), ("seed", seed)):
        if want is not None and rec.get(key) != want:
            return None
    config = rec.get("config")
    if sparsity is not None and isinstance(config, dict):  # a run at another level is not this cell's
        kept = config.get("sparsity_keep")
        if not isinstance(kept, (int, float)) or abs(float(kept) - sparsity) > 1e-9:
            return None
    return rec


def _write_json(path, payload):
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


# ============================================================================ running cells


@contextlib.contextmanager
def _study_lock(output_dir):
    os.makedirs(output_dir, exist_ok=True)
    if fcntl is None:
        yield
        return
    path = os.path.join(output_dir, ".study.lock")
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StudyError(f"{output_dir}: another process is running this study (lock {path})") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()


def _prepare_datasets(study, log):
    from recbole_mm.data import convert

    for dataset, source in study.to_build.items():
        out_dir = os.path.dirname(study.data_dirs[dataset])
        log(f"preparing dataset {dataset} from {source['type']} source into {out_dir}")
        if source["type"] == "ninerec":
            convert.convert_ninerec(source["path"], out_dir, name=dataset,
                                    benchmark=source.get("benchmark", True),
                                    max_history=source.get("max_history", 50))
        elif source["type"] == "movielens":
            convert.convert_movielens(source["path"], out_dir, dataset)
        else:
            convert.convert_amazon(source["reviews"], source["meta"], out_dir, dataset,
                                   kcore=source.get("kcore", 5), image_dir=source.get("image_dir"))
        if not os.path.isfile(os.path.join(study.data_dirs[dataset], f"{dataset}.inter")):
            raise StudyError(f"dataset {dataset}: the {source['type']} conversion wrote no {dataset}.inter "
                             f"into {study.data_dirs[dataset]}")


def _dict_changes(before, after, skip=()):
    """``(key, old, new)`` for each key whose value differs (``'(none)'`` where absent)."""
    missing = object()
    return [(k, before.get(k, "(none)"), after.get(k, "(none)")) for k in sorted(set(before) | set(after), key=str)
            if k not in skip and before.get(k, missing) != after.get(k, missing)]


# where things are, not what runs: a study folder committed or copied to another machine, whose
# datasets live elsewhere there, resumes (the dataset is still named by its name)
LOCATION_KEYS = ("data_path", "share_dir")


# defaults added after cells may have been run, which leave a run on clean data as it was (issues 15-16:
# duplicate/repeat checks that only act on duplicated data, a key check done before the run, and
# text values read as missing, which the feature's input checksum already covers; features encoded
# only for the items a dataset uses, which are the same vectors; the CPU thread
# count): a cell whose recorded defaults lack them is not "run with a different configuration"
BEHAVIOUR_KEEPING_DEFAULTS = (
    "duplicate_interactions", "consecutive_repeats", "strict_config_keys", "cpu_threads",
    # the same samples, order and scores (tests/test_lazy.py); bucketing's default (False) is the old behaviour
    "sequence_samples", "trim_batches", "length_bucketing", "bucket_pool_batches", "ce_memory_mb", "eval_memory_mb",
    "contrastive_memory_mb",
    # softmax: full (the default) is the exact CE as before (tests/test_softmax.py)
    "softmax", "sampled_negatives", "n_sampled_negatives", "logq_correction",
    # missing_modality: zero is today's content vectors bit for bit (tests/test_missing_modality.py); the
    # finetune caches' budgets decide what is recomputed, not the values (float32 default: exact)
    "missing_modality", "encoder_cache_mb", "encoder_cache_dtype", "sft_cache_mb", "sft_cache_dtype",
    # sparsity_keep: 1.0 (the default) thins nothing: the same training samples (tests/test_sparsity.py)
    "sparsity_keep", "sparsity_mode", "sparsity_seed",
    # cold_items: 0.0 holds nothing out (tests/test_cold_start.py); eval_item_sets adds record fields only;
    # activation checkpointing recomputes the same blocks (tests/test_tssr.py); a memory-mapped aligned
    # feature table holds the same values (tests/test_shared_tables.py)
    "cold_items", "cold_items_after", "cold_seed", "eval_item_sets", "activation_checkpointing", "feature_table_mmap",
    # cold_item_rule acts only with cold items (none at the defaults); cells with cold items run before it
    # existed used the mean rule, so such a study is rerun (benchmarks/results/cold_sparsity_food was)
    "cold_item_rule", "cold_item_neighbours",
    # sparse_table_updates: False (the default) is the dense update as before
    "sparse_table_updates",
)
BEHAVIOUR_KEEPING_FEATURE_KEYS = ("missing_values", "encode_items")  # encode_items: unused items are never aligned


def _without_added_defaults(old_defaults, new_defaults):
    """``new_defaults`` less the behaviour-keeping defaults that ``old_defaults`` did not have yet."""
    new = {k: v for k, v in new_defaults.items()
           if not (k in BEHAVIOUR_KEEPING_DEFAULTS and k not in old_defaults)}
    old_specs, new_specs = old_defaults.get("mm_features"), new.get("mm_features")
    if isinstance(old_specs, dict) and isinstance(new_specs, dict):
        new["mm_features"] = {
            name: ({k: v for k, v in spec.items() if not (k in BEHAVIOUR_KEEPING_FEATURE_KEYS and k not in
                                                          (old_specs.get(name) or {}))}
                   if isinstance(spec, dict) else spec)
            for name, spec in new_specs.items()}
    return new


def config_changes(old, spec):
    """How a finished cell's configuration (``old``, its cell file) differs from ``spec``'s now.

    Cells that recorded their defaults are compared on the configuration in effect (the user's
    settings over the defaults), so a default that changed is caught, and pinning the old value
    in the study is not a change. ``data_path`` (where the datasets are) is not compared. Older
    cells (no defaults recorded) compare the fingerprint.
    """
    before, now = old.get("user_config") or {}, _jsonable(spec["user_config"])
    diff = [f"model: {old['model']!r} -> {spec['model']!r}"] if old.get("model") not in (None, spec["model"]) else []
    if old.get("config_files") != spec["config_files"]:
        diff.append("config_files changed")
    elif old.get("config_file_shas") not in (None, spec["config_file_shas"]):
        diff.append("config file contents changed")
    if isinstance(old.get("defaults"), dict) and isinstance(spec.get("defaults"), dict):
        was = dict(old["defaults"], **before)
        is_ = dict(_without_added_defaults(old["defaults"], _jsonable(spec["defaults"])), **now)
        for k, a, b in _dict_changes(was, is_, skip=LOCATION_KEYS):
            diff.append(f"{k}: {a!r} -> {b!r}" + ("" if k in before or k in now else " (a default)"))
        return diff
    if old.get("fingerprint") in (None, spec["fingerprint"]):
        return []
    diff += [f"{k}: {a!r} -> {b!r}" for k, a, b in _dict_changes(before, now)]
    return diff or ["config file contents changed"]


def changed_since_study_start(spec):
    """What changed, between the study's start and now, in the files a cell's configuration is
    read from when it starts: the config files, and RecBole's and the plugin's YAML defaults
    (keys the study sets itself do not count). Empty when nothing did."""
    changes = [f"config file {f} changed" for f, sha in spec.get("config_file_shas") or [] if _file_sha(f) != sha]
    if isinstance(spec.get("defaults"), dict):
        cfg = _build_mmconfig(spec["model"], spec["dataset"], {"data_path": spec["config_dict"]["data_path"]})
        changes += [f"default {k}: {a!r} -> {b!r}" for k, a, b in
                    _dict_changes(spec["defaults"], _without_added_defaults(spec["defaults"], config_defaults(cfg)),
                                  skip=spec.get("user_config") or {})]
    return changes


def _check_finished_specs(study):
    """A finished cell whose configuration changed since is an error (before any training)."""
    changed = []
    for cell in study.cells:
        spec = study.cell_spec(*cell)
        # any model: a variant's may have changed
        if complete_record(spec["record"], spec["dataset"], None, spec["seed"], spec.get("sparsity")) is None:
            continue
        old = _read_json(spec["cell"])
        diff = config_changes(old, spec) if isinstance(old, dict) else []
        if diff:
            changed.append(f"  {cell_text(*cell)}: " + "; ".join(diff))
    if changed:
        raise StudyError(
            f"{study.source}: {len(changed)} finished cell(s) in {study.output_dir} were run with a different "
            "configuration; a study never mixes configurations. Use another output_dir, delete those "
            "cells' records to rerun them, or, for a changed default (a value from RecBole's or the plugin's "
            "properties/*.yaml), set its old value in the study's config or model_config:\n" + "\n".join(changed[:20])
            + (f"\n  ... and {len(changed) - 20} more" if len(changed) > 20 else ""))


def _cell_threads(jobs):
    """CPU threads per cell when ``jobs`` cells share this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(jobs)))


def _child_env(study=None):
    env = dict(os.environ)
    jobs = getattr(study, "jobs", 1) if study is not None else 1
    if jobs > 1 and not env.get("OMP_NUM_THREADS"):
        # parallel cells share the cores: a fixed share each (a cell's cpu_threads: auto would see the
        # others start at the same instant and take every core)
        env["OMP_NUM_THREADS"] = str(_cell_threads(jobs))
    root = _repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["RECBOLE_MM_STUDY_PARENT"] = str(os.getpid())
    return env


def _stop(proc, grace_s=10):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _spec_text(spec):
    return cell_text(spec["dataset"], spec["name"], spec["seed"], spec.get("sparsity"))


def _run_cell(study, spec, log, stop=None):
    """Run one cell in a fresh subprocess; returns its status. ``stop`` (a threading.Event)
    set by another thread stops the subprocess (parallel studies interrupted)."""
    os.makedirs(os.path.dirname(spec["record"]), exist_ok=True)
    os.makedirs(os.path.dirname(spec["log"]), exist_ok=True)
    if os.path.exists(spec["record"]):
        # an incomplete record is never overwritten in place: it is kept aside
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        os.replace(spec["record"], spec["record"] + f".incomplete-{stamp}")
    old = _read_json(spec["cell"]) or {}
    attempts = old.get("attempts", []) if isinstance(old, dict) else []
    started = datetime.datetime.now().isoformat(timespec="seconds")
    attempt = {"started": started, "host": socket.gethostname()}
    state = dict(spec, attempts=attempts + [attempt])
    _write_json(spec["cell"], state)
    status, t0, stopped = "failed", time.perf_counter(), False
    with open(spec["log"], "a", encoding="utf-8") as logf:
        logf.write(f"\n===== {_spec_text(spec)}: attempt at {started}\n")
        logf.flush()
        env = _child_env(study)
        proc = subprocess.Popen(
            [sys.executable, "-m", "recbole_mm.study", "--run-cell", spec["cell"]],
            cwd=study.output_dir, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        try:
            if stop is None:
                proc.wait(timeout=study.cell_timeout_s)
            else:
                deadline = None if study.cell_timeout_s is None else time.monotonic() + study.cell_timeout_s
                while proc.poll() is None:
                    if stop.is_set():
                        _stop(proc)
                        stopped = True
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(proc.args, study.cell_timeout_s)
                    stop.wait(0.5)
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = "timeout"
        except BaseException:
            _stop(proc)
            raise
    wall = time.perf_counter() - t0
    if status != "timeout":
        if complete_record(spec["record"], spec["dataset"], spec["model"], spec["seed"], spec.get("sparsity")) \
                is not None:
            status = "finished"
        elif proc.returncode == EXIT_BUSY:
            status = "busy"
        elif proc.returncode == EXIT_DEFAULTS_CHANGED:
            status = "config changed"
        elif proc.returncode in INTERRUPTED_CODES or stopped:  # a cell the study stopped itself: interrupted
            status = "interrupted"  # stopped by a signal (the study's stop, or one sent to the process group)
    attempt.update(ended=datetime.datetime.now().isoformat(timespec="seconds"), wall_s=round(wall, 3),
                   returncode=proc.returncode, status=status)
    _write_json(spec["cell"], state)
    if status != "finished":
        log(f"cell {_spec_text(spec)}: {status} "
            f"(exit code {proc.returncode}); log: {spec['log']}")
    return status


class StudyTerminated(KeyboardInterrupt):
    """SIGTERM reached the study (``timeout``, a batch scheduler, ``kill``)."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the study like Ctrl-C: running cells are stopped (their records stay
    incomplete and rerun next time), finished ones are kept and the report is still written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise StudyTerminated("study stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cells_ran_on(rows):
    """One line naming where the finished cells ran (host, device, torch), from their records:
    the report may be rebuilt elsewhere (``--report-only``) than where the cells ran."""
    where = {}
    for r in rows:
        if r.get("status") == "finished":
            key = f"{r.get('host') or '?'} ({r.get('device') or '?'}, torch {r.get('torch') or '?'})"
            where[key] = where.get(key, 0) + 1
    if not where:
        return "- cells ran on: (no finished cell)"
    return "- cells ran on: " + "; ".join(f"{k}: {n} cell{'s' if n != 1 else ''}" for k, n in sorted(where.items()))


def _run_cells_parallel(study, todo, jobs, live, bar, log):
    """Run ``todo`` with at most ``jobs`` cell subprocesses at once (threads only wait on them).

    Ctrl-C (or any error) stops the running cells; their records stay incomplete and are rerun
    on the next start, finished ones are kept.
    """
    import concurrent.futures as cf

    stop = threading.Event()

    def one(cell):
        if stop.is_set():
            return cell, "not started"
        status = _run_cell(study, study.cell_spec(*cell), log, stop=stop)
        if status == "interrupted":
            # SIGTERM/SIGINT reached the cell (e.g. sent to the whole process group): the study is being
            # stopped, and the signal may reach this process only after this thread would start the next cell
            stop.set()
        return cell, status

    pool = cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="study-cell")
    try:
        futures = [pool.submit(one, cell) for cell in todo]
        for future in cf.as_completed(futures):
            cell, status = future.result()
            if status != "not started":
                live[cell] = status
                bar.set_postfix_str(f"done {cell_text(*cell)}: {status}")
                bar.update(1)
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _set_parent_death_signal():
    """Linux: this process gets SIGTERM when the study process dies (no orphaned cells)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _cell_worker(cell_file):
    """Body of one cell's subprocess: lock the cell, run it, keep or drop its checkpoint."""
    spec = _read_json(cell_file)
    if not isinstance(spec, dict):
        print(f"recbole_mm.study: cannot read cell file {cell_file}", file=sys.stderr)
        return 2
    parent = os.environ.get("RECBOLE_MM_STUDY_PARENT")
    _set_parent_death_signal()
    if parent and os.getppid() != int(parent):
        print("recbole_mm.study: the study process is gone; not running the cell", file=sys.stderr)
        return 1
    lock = None
    if fcntl is not None:
        lock = open(spec["lock"], "a+")
        deadline = time.monotonic() + CELL_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    print(f"recbole_mm.study: cell is locked by another process ({spec['lock']})", file=sys.stderr)
                    return EXIT_BUSY
                time.sleep(0.5)
    try:
        if complete_record(spec["record"], spec["dataset"], spec["model"], spec["seed"], spec.get("sparsity")) \
                is not None:
            print("recbole_mm.study: cell already finished; nothing to do")
            return 0
        sys.argv = [sys.argv[0]]  # RecBole's Config reads --key=value from the command line
        import recbole_mm  # noqa: F401 - compatibility layer first
        from recbole_mm.quick_start import run_recbole_mm

        changes = changed_since_study_start(spec)
        if changes:
            error = ("the cell's configuration changed since the study started, so it would not match the "
                     "cells that already ran: " + "; ".join(changes) + ". A study never mixes configurations: "
                     "restore the files, or stop the study and start it again (it then names the finished "
                     "cells that used the old configuration)")
            print(f"recbole_mm.study: {error}", file=sys.stderr)
            _write_json(spec["failed"], {"status": "failed", "model": spec["model"], "dataset": spec["dataset"],
                                        "seed": spec["seed"], **({"sparsity": spec["sparsity"]} if "sparsity" in spec
                                                                 else {}), "error": error})
            return EXIT_DEFAULTS_CHANGED

        print(f"cell: {_spec_text(spec)}", flush=True)
        try:
            config_dict = dict(spec["config_dict"])
            if spec.get("share_dir"):  # a location (LOCATION_KEYS), not part of the cell's configuration
                config_dict["share_dir"] = spec["share_dir"]
            result = run_recbole_mm(model=spec["model"], dataset=spec["dataset"],
                                    config_file_list=spec["config_files"] or None,
                                    config_dict=config_dict, saved=True)
        except KeyboardInterrupt as exc:  # SIGTERM/SIGHUP/Ctrl-C: the run wrote its interrupted record
            print(f"recbole_mm.study: cell interrupted ({exc or 'Ctrl-C'})", file=sys.stderr)
            return getattr(exc, "exit_code", 128 + signal.SIGINT)
        rec = _read_json(result.get("record_path") or spec["record"]) or {}
        if not spec.get("keep_checkpoints", True) and rec.get("checkpoint"):
            with contextlib.suppress(OSError):
                os.remove(rec["checkpoint"])
        print(f"test result: {json.dumps({k: float(v) for k, v in result['test_result'].items()})}")
        return 0
    finally:
        if lock is not None:
            lock.close()


# ============================================================================ collecting results


def _metric_label(key):
    name, _, k = key.partition("@")
    label = METRIC_NAMES.get(name, name)
    return f"{label}@{k}" if k else label


def _smaller_is_better(key):
    from recbole.evaluator.register import smaller_metrics

    return key.split("@")[0] in smaller_metrics


def collect_cells(study, live_status=None):
    """One row per cell: identity, status, timings and every validation/test metric."""
    rows = []
    live_status = live_status or {}
    for cell in study.cells:
        d, m, s = cell[:3]
        level = cell[3] if len(cell) > 3 else None
        paths = study.cell_paths(*cell)
        rec = study.finished_record(*cell)
        state = _read_json(paths["cell"]) or {}
        attempts = state.get("attempts", []) if isinstance(state, dict) else []
        last = attempts[-1] if attempts else {}
        row = {"dataset": d, "model": m, "seed": s, **({} if level is None else {"sparsity": level}),
               "role": _model_role(m, study.proposed)}
        dead = dead_run(paths["record"]) if rec is None else None
        if rec is not None:
            row["status"] = "finished"
        elif cell in live_status:
            row["status"] = live_status[cell]
        elif last and "ended" not in last:
            row["status"] = "interrupted"
        elif last and not (dead is not None and last.get("status", "failed") == "failed"):
            row["status"] = last.get("status", "failed")  # the study's own account: interrupted, timeout, ...
        elif dead is not None:  # its process died without a record: SIGKILL, the OOM killer
            row["status"] = "killed"
        elif last:
            row["status"] = last.get("status", "failed")
        else:
            row["status"] = "pending"
        timings = (rec or {}).get("timings_s") or {}
        # the cell processes' wall time, summed over attempts: a cell interrupted and resumed from its
        # checkpoint cost all of them; the run's own total when the study was killed before noting it
        walls = [a["wall_s"] for a in attempts if isinstance(a, dict) and a.get("wall_s") is not None]
        if rec is not None and last.get("wall_s") is None and timings.get("total") is not None:
            walls.append(timings["total"])
        wall = sum(walls) if walls else None
        row["attempts"] = len(attempts)
        row["wall_time_s"] = round(wall, 3) if wall is not None else None
        row["run_time_s"] = round(timings["total"], 3) if "total" in timings else None
        row["train_time_s"] = round(timings["train"], 3) if "train" in timings else None
        history = (rec or {}).get("history") or {}
        config = (rec or {}).get("config") or {}
        row["epochs"] = len(history.get("train_loss") or []) if rec else None
        # median seconds of one training pass (no evaluation) over the run's epochs (records since 2026-12-04)
        epoch_s = [float(x) for x in history.get("train_epoch_s") or [] if x is not None]
        row["train_epoch_s"] = round(statistics.median(epoch_s), 3) if epoch_s else None
        row["max_epochs"] = config.get("epochs")
        # a multi-stage run (the record's "stages", from its trainer's stage_summaries): its first
        # stage's name, label, epochs (None when the stage was reused, not trained) and test result
        row["stage"] = _first_stage(rec or {})
        row["device"] = (rec or {}).get("device")
        row["host"] = (rec or {}).get("host")
        row["torch"] = ((rec or {}).get("versions") or {}).get("torch")
        row["valid_metric"] = (rec or {}).get("valid_metric")
        row["best_valid_score"] = (rec or {}).get("best_valid_score")
        row["test"] = {k: float(v) for k, v in ((rec or {}).get("test_result") or {}).items()}
        row["valid"] = {k: float(v) for k, v in ((rec or {}).get("best_valid_result") or {}).items()}
        slices = (rec or {}).get("test_slices")
        # test metrics per slice (recbole_mm.slices); absent or {"skipped": why} when not sliced
        row["slices"] = {k: v for k, v in slices.items() if isinstance(v, dict) and "buckets" in v} \
            if isinstance(slices, dict) else None
        row["valid_curve"] = [float(v) for v in history.get("valid_score") or []]
        row["eval_step"] = config.get("eval_step") or 1
        if level is not None:  # how the level thinned the training data (the records' own settings)
            row["sparsity_mode"] = config.get("sparsity_mode")
            row["sparsity_seed"] = config.get("sparsity_seed")
        row["record"] = os.path.relpath(paths["record"], study.output_dir)
        row["log"] = os.path.relpath(paths["log"], study.output_dir)
        row["error"] = None
        if rec is None:
            failed = _read_json(paths["failed"])
            if isinstance(failed, dict) and failed.get("error") and row["status"] != "pending":
                row["error"] = failed["error"]
            if row["status"] == "killed":
                row["error"] = (f"the run (pid {dead.get('pid')}, started {dead.get('started_at')}) died without "
                                "a record: killed by SIGKILL or the OOM killer")
        rows.append(row)
    return rows


def _report_metrics(study, rows):
    if study.report:
        return list(study.report)
    seen = []
    for row in rows:
        for k in row["test"]:
            if k not in seen:
                seen.append(k)
    return seen


def _mean_std(values):
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def _paired_test(a, b):
    """Paired t-test (scipy.stats.ttest_rel) of per-seed values; returns (p or None, n)."""
    n = len(a)
    if n < 2:
        return None, n
    from scipy import stats

    with contextlib.suppress(Exception):
        p = float(stats.ttest_rel(a, b).pvalue)
        if math.isnan(p):
            return None, n
        return p, n
    return None, n


# ---------------------------------------------------------------- multiple comparisons, intervals


def _tested(pvalues):
    """Indices of the tested p-values (neither None nor NaN), which make the family; a p-value
    outside [0, 1] is an error."""
    indices = []
    for i, p in enumerate(pvalues):
        if p is None or math.isnan(p):
            continue
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value {p!r} (position {i}) is not in [0, 1]")
        indices.append(i)
    return sorted(indices, key=lambda i: pvalues[i])  # stable: ties keep their order


def holm(pvalues):
    """Holm's (1979) step-down adjusted p-values, in the order given.

    Over the m tested values sorted ascending, p_(1) <= ... <= p_(m): adjusted
    p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)), so the adjusted values are monotone in p and
    at most 1. Rejecting where the adjusted p <= alpha controls the family-wise error rate at
    alpha under any dependence between the tests. None and NaN entries (comparisons without a
    test) are returned as they are and do not count in m."""
    out = list(pvalues)
    order = _tested(pvalues)
    m, running = len(order), 0.0
    for j, i in enumerate(order):  # j = rank - 1
        running = max(running, min(1.0, (m - j) * pvalues[i]))
        out[i] = running
    return out


def benjamini_hochberg(pvalues):
    """Benjamini-Hochberg (1995) step-up adjusted p-values, in the order given.

    Over the m tested values sorted ascending: adjusted p_(i) = min_{j >= i} min(1, m p_(j) / j).
    Rejecting where the adjusted p <= q controls the false discovery rate at q for independent
    or positively dependent tests. None and NaN entries as in :func:`holm`."""
    out = list(pvalues)
    order = _tested(pvalues)
    m, running = len(order), 1.0
    for j in range(m - 1, -1, -1):
        running = min(running, m * pvalues[order[j]] / (j + 1))
        out[order[j]] = running
    return out


P_ADJUST_FUNCTIONS = {"holm": holm, "bh": benjamini_hochberg}
P_ADJUST_FULL_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg"}
CI_LEVEL = 0.95


def ci_half_width(std, n, level=CI_LEVEL):
    """Half-width of the two-sided ``level`` t confidence interval of a mean of ``n`` values whose
    sample std is ``std``: t_{(1 + level) / 2, n - 1} * std / sqrt(n); None when n < 2."""
    if std is None or n is None or n < 2:
        return None
    from scipy import stats

    return float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)


class PFamily:
    """The p-values of one report (or of one table) adjusted together for multiple comparisons.

    Tables are rendered twice: on the first pass (the family open) :meth:`adjust` records the raw
    p of each tested comparison under its key and returns None; :meth:`close` adjusts them all
    (``method``: holm, bh or none); on the second pass :meth:`adjust` returns the key's adjusted p
    (with ``none``, the raw p). Comparisons without a p-value (fewer than 2 pairs, identical runs)
    are not in the family."""

    def __init__(self, method="holm", scope="report"):
        self.method = method
        self.scope = scope  # "report" or "table": what the family is, said in the headers
        self.raw, self.adjusted = {}, None

    def adjust(self, key, p):
        if p is None or math.isnan(p):
            return None
        if self.adjusted is None:
            if key in self.raw:
                raise ValueError(f"comparison {key!r} is in the family twice")
            self.raw[key] = p
            return None
        return self.adjusted.get(key)

    def close(self):
        keys = list(self.raw)
        adjust = P_ADJUST_FUNCTIONS.get(self.method)
        values = [self.raw[k] for k in keys]
        self.adjusted = dict(zip(keys, adjust(values) if adjust else values))
        return self

    @property
    def size(self):
        return len(self.raw)

    @property
    def label(self):
        """The adjusted p's name in the tables (p_Holm, p_BH), None without correction."""
        return {"holm": "p_Holm", "bh": "p_BH"}.get(self.method)

    def header(self):
        """For a table header: which p-values the table shows and over which family."""
        if not self.label:
            return "p: not adjusted"
        return (f"{self.label}: {P_ADJUST_FULL_NAMES[self.method]}, {self.size} comparison"
                f"{'s' if self.size != 1 else ''} in the {self.scope}")

    def sentence(self, marks=False):
        """For a table's caption: what the adjusted p is (``marks``: and that the table's p < 0.05
        marks use it)."""
        if not self.label:
            return ("p-values are not adjusted for multiple comparisons (`p_adjust: none`)"
                    + ("; the p<0.05 marks use the raw p." if marks else "."))
        what = P_ADJUST_METHODS[self.method]
        family = ("every tested comparison of the report: each proposed model vs the best baseline, "
                  "the step-1 and the variant comparisons, over all datasets and metrics"
                  if self.scope == "report" else "the tested comparisons of this table")
        return (f"{self.label}: p adjusted ({what}) over a family of {self.size} p-value"
                f"{'s' if self.size != 1 else ''}, {family} (comparisons with p = n/a are not counted); "
                f"the raw p stands next to it" + (f", and the p<0.05 marks use {self.label}." if marks else "."))

    def significant(self, p, p_adj, alpha=0.05):
        value = p_adj if self.label else p
        return value is not None and value < alpha

    def test_text(self, p, p_adj, n):
        """"p=0.0312, p_Holm=0.0936, n=3" ("p=n/a, n=1" without a test)."""
        adjusted = f", {self.label}={_fmt_p(p_adj)}" if self.label and p is not None else ""
        return f"p={_fmt_p(p)}{adjusted}, n={n}"


def _in_family(study, family, render):
    """``render(family)`` with the report's family; called for one table alone (``family`` None),
    a family of that table: a first pass collects its p-values, the second shows them adjusted."""
    if family is None:
        family = PFamily(getattr(study, "p_adjust", "holm"), scope="table")
        render(family)
        family.close()
    return render(family)


def _mean_header(label):
    return f"{label}: mean ± std (± {CI_LEVEL:.0%} CI)"


CI_SENTENCE = (f"In brackets: the half-width of the two-sided {CI_LEVEL:.0%} t confidence interval of the "
               f"mean over the seeds, t({(1 + CI_LEVEL) / 2:g}, n-1) · std / √n (n/a with one seed).")


def dataset_summary(study, rows, dataset, metrics):
    """Per model: n, mean/std per metric; per proposed model: improvement and test vs the best baseline."""
    per_model = {}
    for m in study.models:
        cells = [r for r in rows if r["dataset"] == dataset and r["model"] == m and r["status"] == "finished"]
        values = {k: {r["seed"]: r["test"][k] for r in cells if k in r["test"]} for k in metrics}
        per_model[m] = {"n": len(cells), "values": values,
                        "stats": {k: _mean_std(list(v.values())) for k, v in values.items()}}
    best, best_baseline, comparisons = {}, {}, {}
    for k in metrics:
        smaller = _smaller_is_better(k)
        pick = min if smaller else max
        means = {m: per_model[m]["stats"][k][0] for m in study.models if per_model[m]["stats"][k][0] is not None}
        best[k] = pick(means.values()) if means else None
        base = {m: v for m, v in means.items() if m not in study.proposed}
        best_baseline[k] = pick(base, key=base.get) if base else None
        for m in study.proposed:
            b = best_baseline[k]
            if m not in means or b is None:
                comparisons[m, k] = None
                continue
            mine, theirs = means[m], means[b]
            rel = None if theirs == 0 else (mine - theirs) / abs(theirs) * (-1 if smaller else 1) * 100
            seeds = sorted(set(per_model[m]["values"][k]) & set(per_model[b]["values"][k]))
            p, n = _paired_test([per_model[m]["values"][k][s] for s in seeds],
                                [per_model[b]["values"][k][s] for s in seeds])
            better = mine < theirs if smaller else mine > theirs
            comparisons[m, k] = {"baseline": b, "relative_pct": rel, "p": p, "n": n, "better": better}
    return {"per_model": per_model, "best": best, "best_baseline": best_baseline, "comparisons": comparisons}


def _fmt(v, digits=4):
    return "—" if v is None else f"{v:.{digits}f}"


def _fmt_p(p):
    if p is None:
        return "n/a"
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def _range_text(values, unit=""):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    lo, hi = min(values), max(values)
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def _epochs_part(cells, key, cap_key):
    text = _range_text([r.get(key) for r in cells])
    if text != "—" and all(r.get(key) is not None and r.get(key) == r.get(cap_key) for r in cells):
        text += " (cap)"
    return text


def _epochs_text(cells):
    """Epochs over a model's finished cells: "12 (cap)", "25-28", "12 (cap) + 9-12" (first stage + the run)."""
    if not cells:
        return "—"
    text = _epochs_part(cells, "epochs", "max_epochs")
    if any((r.get("stage") or {}).get("max_epochs") is not None for r in cells):
        stage = _epochs_part([r.get("stage") or {} for r in cells], "epochs", "max_epochs")
        text = f"{'reused' if stage == '—' else stage} + {text}"
    return text


def _wall_text(cells):
    return _range_text([None if r.get("wall_time_s") is None else round(r["wall_time_s"]) for r in cells], " s")


def _epoch_time_text(cells):
    """Seconds per training epoch (each cell's median over its epochs), shortest-longest over cells."""
    return _range_text([None if r.get("train_epoch_s") is None else round(r["train_epoch_s"], 1) for r in cells],
                       " s")


def dataset_table(study, rows, dataset, metrics, family=None):
    """Markdown table (and comparison) for one dataset, and its summary. ``family``: the
    :class:`PFamily` of the report, whose adjusted p-values it shows (default: one of this table)."""
    return _in_family(study, family, lambda fam: _dataset_table(study, rows, dataset, metrics, fam))


def _dataset_table(study, rows, dataset, metrics, family):
    summary = dataset_summary(study, rows, dataset, metrics)
    pm = summary["per_model"]
    labels = [_metric_label(k) for k in metrics]
    n_max = max((pm[m]["n"] for m in study.models), default=0)
    lines = [f"## {dataset}", ""]
    lines.append(f"Test metrics, mean ± std over seeds ({', '.join(map(str, study.seeds))}); n = finished seeds. "
                 f"{CI_SENTENCE} **Bold**: best mean per metric. "
                 f"Baselines: {', '.join(m for m in study.models if m not in study.proposed) or 'none'}; "
                 f"proposed: {', '.join(study.proposed) or 'none'}.")
    lines.append("")
    lines.append("| Model | Role | n | " + " | ".join(map(_mean_header, labels)) + " | epochs | wall time / cell |")
    lines.append("|---|---|---|" + "---|" * len(labels) + "---|---|")
    for m in study.models:
        finished = [r for r in rows if r["dataset"] == dataset and r["model"] == m and r["status"] == "finished"]
        cells = []
        for k in metrics:
            mean, std = pm[m]["stats"][k]
            if mean is None:
                cells.append("—")
                continue
            text = _fmt_mean_std(mean, std, len(pm[m]["values"][k]))
            if summary["best"][k] is not None and mean == summary["best"][k]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {m} | {_model_role(m, study.proposed)} | {pm[m]['n']} | " + " | ".join(cells)
                     + f" | {_epochs_text(finished)} | {_wall_text(finished)} |")
    lines.append("")
    lines.append("epochs: training epochs run, the range over seeds; (cap) when every seed ran to its `epochs` "
                 "limit instead of stopping early; multi-stage runs (e.g. SICSRec) show their first stage + the run. wall time: the "
                 "cell's processes (summed over its attempts when it was interrupted and resumed), shortest-longest "
                 "over seeds; cells that ran at the same time shared the machine.")
    lines.append("")
    if study.proposed:
        lines.append("Relative improvement of each proposed model over the best baseline per metric (difference "
                     "of the means / baseline mean), and a two-sided paired t-test over the seeds both finished "
                     "(scipy.stats.ttest_rel; n = pairs; fewer than 2 seeds: n/a). " + family.sentence(marks=True))
        lines.append("")
        lines.append(f"| Model ({family.header()}) | " + " | ".join(labels) + " |")
        lines.append("|---|" + "---|" * len(labels))
        verdicts = []
        for m in study.proposed:
            cells, wins, losses = [], [], []
            for k, label in zip(metrics, labels):
                c = summary["comparisons"].get((m, k))
                if c is None:
                    cells.append("—")
                    continue
                rel = "n/a" if c["relative_pct"] is None else f"{c['relative_pct']:+.1f}%"
                c["p_adj"] = family.adjust(("vs best baseline", dataset, m, c["baseline"], k), c["p"])
                cells.append(f"{rel} vs {c['baseline']} ({family.test_text(c['p'], c['p_adj'], c['n'])})")
                marked = c["better"] and family.significant(c["p"], c["p_adj"])
                (wins if c["better"] else losses).append(
                    label + (f" ({family.label or 'p'}<0.05)" if marked else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
            if wins or losses:
                text = f"- {m}: "
                text += f"beats the best baseline on {', '.join(wins)}" if wins else "beats the best baseline on no metric"
                if losses:
                    text += f"; does **not** beat it on {', '.join(losses)}"
                verdicts.append(text + ".")
        lines.append("")
        lines.extend(verdicts)
        if verdicts:
            lines.append("")
    if n_max == 0:
        lines.append("_No finished cells yet._")
        lines.append("")
    return "\n".join(lines), summary


SLICE_TITLES = {"target_popularity": "Target popularity (training interactions of the target item)",
                "history_length": "History length (the user's interactions before the test target)",
                "modality": "Target modality (content the target item has)",
                "item_set": "Target item set (cold_items: warm = trained on, cold = held out of training)"}


def _slice_metrics(cells, metrics):
    """The report's metrics at the valid metric's cut-off (``ndcg@10`` -> HR@10, NDCG@10, ...) that the
    records slice; all sliced report metrics when the valid metric has no cut-off."""
    sliced = set()
    for r in cells:
        for family in r["slices"].values():
            for bucket in family["buckets"].values():
                sliced.update(k for k in bucket if k != "n")
    valid = next((str(r["valid_metric"]).lower() for r in cells if r.get("valid_metric")), "")
    k = valid.partition("@")[2]
    chosen = [m for m in metrics if m in sliced and (not k or m.partition("@")[2] == k)]
    return chosen or [m for m in metrics if m in sliced]


def slices_table(study, rows, dataset, metrics):
    """The "Slices" section of one dataset (markdown; "" when no finished record has slices): per
    slice family, per model and bucket, the mean over finished seeds of the valid metric's family
    (e.g. HR@10 / NDCG@10), and the test users per bucket."""
    cells = [r for r in rows if r["dataset"] == dataset and r["status"] == "finished" and r.get("slices")]
    keys = _slice_metrics(cells, metrics) if cells else []
    if not keys:
        return ""
    lines = [f"### {dataset}: slices", "",
             f"Test metrics per slice of the test users: {' / '.join(_metric_label(k) for k in keys)}, mean over "
             "the finished seeds; `users`: test users in the bucket (a range when the runs differ). Buckets "
             "no run has users in are left out; a model without item features has no modality slice. "
             "Definitions and bucket edges: `test_slices` of each run record (`recbole_mm.slices`).", ""]
    for family in ("target_popularity", "history_length", "modality", "item_set"):
        have = [r for r in cells if family in r["slices"]]
        if not have:
            continue
        labels = []
        for r in have:
            labels += [b for b, v in r["slices"][family]["buckets"].items() if v.get("n") and b not in labels]
        if not labels:
            continue
        lines += [f"**{SLICE_TITLES.get(family, family)}**", ""]
        lines.append("| Model | " + " | ".join(labels) + " |")
        lines.append("|---|" + "---|" * len(labels))
        users = [_range_text([(r["slices"][family]["buckets"].get(b) or {}).get("n") for r in have]) for b in labels]
        lines.append("| users | " + " | ".join(users) + " |")
        for m in study.models:
            mine = [r for r in have if r["model"] == m]
            if not mine:
                continue
            texts = []
            for b in labels:
                means = []
                for k in keys:
                    values = [r["slices"][family]["buckets"].get(b, {}).get(k) for r in mine]
                    values = [float(v) for v in values if v is not None]
                    means.append(_fmt(sum(values) / len(values)) if values else "—")
                texts.append(" / ".join(means))
            lines.append(f"| {m} | " + " | ".join(texts) + " |")
        lines.append("")
    return "\n".join(lines)


def _valid_family(cells, metrics):
    """The report's metrics at the valid metric's cut-off (``ndcg@10`` -> hit@10, ndcg@10, ...); the
    valid metric alone when it has no cut-off; every metric when neither is among them."""
    valid = next((str(r["valid_metric"]).lower() for r in cells if r.get("valid_metric")), "")
    k = valid.partition("@")[2]
    chosen = [m for m in metrics if m.partition("@")[2] == k] if k else [m for m in metrics if m == valid]
    return chosen or list(metrics)


def sparsity_table(study, rows, dataset, metrics):
    """The "accuracy vs sparsity" section of one dataset (the study's ``sparsity:`` axis): per metric
    of the valid metric's family, a table of models x levels with the mean ± std of the test metric
    over the finished seeds and the change of the mean from the model's at the largest level.
    Returns ``(markdown, curves)``, ``curves[metric][model]``: ``[(level, mean, std), ...]`` (for
    :func:`plot_sparsity`)."""
    levels = sorted(study.sparsity or [], reverse=True)
    finished = [r for r in rows
                if r["dataset"] == dataset and r["status"] == "finished" and r.get("sparsity") is not None]
    keys = _valid_family(finished, metrics)
    modes = sorted({str(r.get("sparsity_mode") or "prefix") for r in finished})
    seeds = sorted({"the run's seed" if r.get("sparsity_seed") is None else str(r["sparsity_seed"]) for r in finished})
    lines = [f"## {dataset}: accuracy vs training-data sparsity", "",
             f"Test {' / '.join(_metric_label(k) for k in keys)} (the valid metric's family) per level of the "
             "study's `sparsity:` axis, the fraction of the training data kept (`sparsity_keep`"
             + (f"; mode {', '.join(modes)}, draws seeded by {', '.join(seeds)}" if finished else "")
             + "; `recbole_mm.data.sparsity`, docs/STUDIES.md). Only the training split is thinned: validation and "
             "test samples, targets and histories are the same at every level. Mean ± std over the finished "
             f"seeds; in brackets the change of the mean from the model's own at keep {levels[0]:g}"
             + f"; [n=…] where not all {len(study.seeds)} seeds finished.",
             ""]
    curves = {k: {} for k in keys}
    if not finished:
        return "\n".join(lines + ["_No finished cells yet._", ""]), curves
    for key in keys:
        lines += [f"**{_metric_label(key)}**", "",
                  "| Model | " + " | ".join(f"keep {k:g}" for k in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for m in study.models:
            stats = {}
            for k in levels:
                values = [r["test"][key] for r in finished
                          if r["model"] == m and r["sparsity"] == k and key in r["test"]]
                if values:
                    stats[k] = (*_mean_std(values), len(values))
            if not stats:
                continue
            reference = stats.get(levels[0], (None,))[0]
            texts = []
            for k in levels:
                if k not in stats:
                    texts.append("—")
                    continue
                mean, std, n = stats[k]
                text = _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "")
                if k != levels[0] and reference:
                    text += f" ({(mean - reference) / abs(reference) * 100:+.1f}%)"
                if n < len(study.seeds):
                    text += f" [n={n}]"
                texts.append(text)
            lines.append(f"| {m} | " + " | ".join(texts) + " |")
            curves[key][m] = [(k, stats[k][0], stats[k][1]) for k in sorted(stats)]
        lines.append("")
    return "\n".join(lines), curves


def machine_info():
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    with contextlib.suppress(Exception):
        import recbole

        info["recbole"] = recbole.__version__
    return info


# ============================================================================ plots


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path):
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return write_text_atomic(path, buf.getvalue(), mode="wb")


def plot_metrics(study, summary, dataset, metrics, path):
    """Grouped bars: one group per metric, one bar per model, error bars = std over seeds."""
    pm = summary["per_model"]
    models = [m for m in study.models if pm[m]["n"] > 0]
    if not models or not metrics:
        return None
    fig = _figure(max(5.0, 1.2 * len(metrics) * max(1, len(models)) / 3 + 2), 3.8)
    ax = fig.add_subplot(111)
    width = 0.8 / len(models)
    colors = [f"C{i % 10}" for i in range(len(models))]
    for j, m in enumerate(models):
        means = [pm[m]["stats"][k][0] or 0.0 for k in metrics]
        stds = [pm[m]["stats"][k][1] or 0.0 for k in metrics]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(metrics))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=m, color=colors[j],
               hatch="//" if m in study.proposed else None, edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([_metric_label(k) for k in metrics])
    ax.set_ylabel("test value (mean ± std over seeds)")
    ax.set_title(f"{study.name}: {dataset}")
    ax.legend(fontsize=8, ncol=min(4, len(models)), loc="upper left", bbox_to_anchor=(0, -0.12))
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


def plot_valid_curves(study, rows, dataset, path):
    """Validation score per epoch, one line per model (mean over seeds, band = min..max)."""
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot(111)
    drawn, metric = 0, None
    for j, m in enumerate(study.models):
        curves = [(r["valid_curve"], r["eval_step"]) for r in rows
                  if r["dataset"] == dataset and r["model"] == m and r["status"] == "finished" and r["valid_curve"]]
        if not curves:
            continue
        metric = metric or next(r["valid_metric"] for r in rows if r["dataset"] == dataset and r["model"] == m
                                and r["valid_metric"])
        length = max(len(c) for c, _ in curves)
        step = curves[0][1] or 1
        xs, mean, lo, hi = [], [], [], []
        for i in range(length):
            vals = [c[i] for c, _ in curves if i < len(c)]
            xs.append((i + 1) * step)
            mean.append(sum(vals) / len(vals))
            lo.append(min(vals))
            hi.append(max(vals))
        color = f"C{j % 10}"
        ax.plot(xs, mean, marker="o" if length < 30 else None, markersize=3, label=m, color=color,
                linestyle="--" if m in study.proposed else "-")
        if len(curves) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
        drawn += 1
    if not drawn:
        return None
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric or 'score'}")
    ax.set_title(f"{study.name}: {dataset} (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_sparsity(study, curves, dataset, path):
    """Accuracy vs the fraction of the training data kept: one panel per metric (the valid metric's
    family), one line per model (mean over seeds, error bars = std), keep on a log axis."""
    keys = [k for k in curves if curves[k]]
    if not keys:
        return None
    levels = sorted(study.sparsity or [])
    fig = _figure(max(5.0, 4.2 * len(keys)), 3.8)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for j, m in enumerate(study.models):
            points = curves[key].get(m)
            if not points:
                continue
            xs, means, stds = zip(*points)
            ax.errorbar(xs, means, yerr=[s or 0.0 for s in stds], marker="o", markersize=4, capsize=3, label=m,
                        color=f"C{j % 10}", linestyle="--" if m in study.proposed else "-")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(levels)
        ax.set_xticklabels([f"{k:g}" for k in levels])
        ax.set_xlabel("fraction of the training data kept")
        ax.set_ylabel(f"test {_metric_label(key)}")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.subplots_adjust(wspace=0.3)
    fig.suptitle(f"{study.name}: {dataset}, accuracy vs training-data sparsity (mean ± std over seeds)")
    return _save_figure(fig, path)


# ============================================================================ report


_CSV_FIXED = ["dataset", "model", "seed", "role", "status", "wall_time_s", "attempts", "run_time_s", "train_time_s",
              "train_epoch_s", "epochs",
              "max_epochs", "device", "host", "torch", "valid_metric", "best_valid_score"]


def _csv_text(rows):
    import csv
    import io

    fixed = list(_CSV_FIXED)
    if any("sparsity" in r for r in rows):  # the study's sparsity axis: the level after the seed
        fixed.insert(fixed.index("seed") + 1, "sparsity")

    # multi-stage runs: <stage>_epochs after max_epochs, <stage>_test_<metric> after the valid columns
    stages = []
    for r in rows:
        name = (r.get("stage") or {}).get("name")
        if name and name not in stages:
            stages.append(name)
    fixed[fixed.index("max_epochs") + 1:fixed.index("max_epochs") + 1] = [f"{n}_epochs" for n in stages]
    test_keys, valid_keys, stage_keys = [], [], []
    for r in rows:
        test_keys += [k for k in r["test"] if k not in test_keys]
        valid_keys += [k for k in r["valid"] if k not in valid_keys]
        stage_keys += [k for k in (r.get("stage") or {}).get("test") or {} if k not in stage_keys]
    header = (fixed + [f"test_{k}" for k in test_keys] + [f"valid_{k}" for k in valid_keys]
              + [f"{n}_test_{k}" for n in stages for k in stage_keys] + ["record", "log", "error"])

    def stage_value(r, name, key):
        stage = r.get("stage") or {}
        if stage.get("name") != name:
            return ""
        value = stage.get("epochs") if key is None else (stage.get("test") or {}).get(key)
        return "" if value is None else value

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow([stage_value(r, c[:-len("_epochs")], None) if c.endswith("_epochs") and c[:-len("_epochs")] in stages
                         else (r.get(c) if r.get(c) is not None else "") for c in fixed]
                        + [r["test"].get(k, "") for k in test_keys] + [r["valid"].get(k, "") for k in valid_keys]
                        + [stage_value(r, n, k) for n in stages for k in stage_keys]
                        + [r["record"], r["log"], r["error"] or ""])
    return buf.getvalue()


def _fmt_mean_std(mean, std, n=None):
    """"0.3100 ± 0.0100"; with ``n`` (the number of values), the CI half-width in brackets:
    "0.3100 ± 0.0100 (± 0.0248)", "0.3000 (n/a)" for one value."""
    if mean is None:
        return "—"
    text = _fmt(mean) + (f" ± {_fmt(std)}" if std is not None else "")
    if n is not None:
        half = ci_half_width(std, n)
        text += " (n/a)" if half is None else f" (± {_fmt(half)})"
    return text


def _paired_metric(a_by_seed, b_by_seed, k):
    """``a`` against ``b`` on metric ``k``, paired by seed over the seeds both have: each one's
    (mean, std), n, ``identical`` (every pair equal: the same runs, no test to do) and, when there
    is a difference to test, the relative difference of the means (%, positive: ``a`` is better)
    and the paired t-test's p."""
    seeds = [s for s in sorted(set(a_by_seed) & set(b_by_seed)) if k in a_by_seed[s] and k in b_by_seed[s]]
    a, b = [a_by_seed[s][k] for s in seeds], [b_by_seed[s][k] for s in seeds]
    out = {"a": _mean_std(a), "b": _mean_std(b), "n": len(a), "identical": a == b, "relative_pct": None, "p": None}
    (ma, _), (mb, _) = out["a"], out["b"]
    if ma is not None and mb and a != b:
        out["relative_pct"] = (-1 if _smaller_is_better(k) else 1) * (ma - mb) / abs(mb) * 100
        out["p"] = _paired_test(a, b)[0]
    return out


def _comparison_text(c, family=None):
    """A :func:`_paired_metric` result in words: "+4.6% (p=0.0312, n=3)", with a ``family``
    (:class:`PFamily`) and ``c["p_adj"]``: "+4.6% (p=0.0312, p_Holm=0.0936, n=3)"."""
    if c["a"][0] is None or not c["b"][0]:
        return "—"
    if c["identical"]:  # the same runs (e.g. a SASRec cell and SICSRec's step 1 of that seed)
        return f"identical on every seed (n={c['n']})"
    test = (family.test_text(c["p"], c.get("p_adj"), c["n"]) if family is not None
            else f"p={_fmt_p(c['p'])}, n={c['n']}")
    return f"{c['relative_pct']:+.1f}% ({test})"


def _adjust_all(comparisons, metrics, family, key):
    """Each comparison's adjusted p (``c["p_adj"]``) from ``family``, keyed by ``key`` + (metric,)."""
    for c, k in zip(comparisons, metrics):
        c["p_adj"] = family.adjust(key + (k,), c["p"])


def _paired_rows(a_by_seed, b_by_seed, metrics, family, key):
    """Seeds both have; ``a``'s and ``b``'s mean ± std (and CI) per metric over those pairs; and
    ``a`` against ``b`` paired by seed, its p adjusted in ``family`` under ``key`` + (metric,)
    ("identical on every seed" when every pair is equal)."""
    comparisons = [_paired_metric(a_by_seed, b_by_seed, k) for k in metrics]
    _adjust_all(comparisons, metrics, family, key)
    return (sorted(set(a_by_seed) & set(b_by_seed)), [_fmt_mean_std(*c["a"], c["n"]) for c in comparisons],
            [_fmt_mean_std(*c["b"], c["n"]) for c in comparisons],
            [_comparison_text(c, family) for c in comparisons])


def _first_stage(rec):
    """The first of a record's ``stages`` (a multi-stage run's earlier stage, from its trainer's
    ``stage_summaries``) as ``{name, label, model, epochs, max_epochs, test, description}``, or None.
    Records written before ``stages`` existed (until 2026-12-04) kept SICSRec's step 1 in
    ``history.step1``: read from there."""
    stages = rec.get("stages")
    if isinstance(stages, list) and stages and isinstance(stages[0], dict):
        stage = dict(stages[0])
    else:
        history = rec.get("history") if isinstance(rec.get("history"), dict) else {}
        old = history.get("step1") if isinstance(history.get("step1"), dict) else None
        if old is None:
            return None
        config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
        trained = old.get("history") if isinstance(old.get("history"), dict) else None
        stage = {"name": "step1", "label": "step-1 SASRec", "model": "SASRec",
                 "epochs": len(trained.get("train_loss") or []) if trained else None,
                 "max_epochs": (config.get("step1_config") or {}).get("epochs", config.get("epochs")),
                 "test_result": old.get("test_result")}
    test = stage.pop("test_result", None)
    stage["test"] = {k: float(v) for k, v in test.items()} if isinstance(test, dict) and test else None
    return stage


def stage_table(study, rows, dataset, metrics, family=None):
    """Markdown: each model whose records carry an earlier stage's test result (e.g. SICSRec's step-1
    SASRec) against that stage, paired per seed (the same run's own earlier model); '' when no row has
    one. The other models of the study are compared with the same stage model of the same seed (same
    config, split and evaluator), so a study gets that baseline without a cell of its own. ``family``:
    as in :func:`dataset_table`."""
    return _in_family(study, family, lambda fam: _stage_table(study, rows, dataset, metrics, fam))


def _stage_table(study, rows, dataset, metrics, family):
    lines = []
    finished = [r for r in rows if r["dataset"] == dataset and r["status"] == "finished"]

    def staged(r):
        return (r.get("stage") or {}).get("test")

    with_stage = [m for m in study.models if any(r["model"] == m and staged(r) for r in finished)]
    for m in with_stage:
        cells = [r for r in finished if r["model"] == m and staged(r)]
        stage = cells[0]["stage"]
        label, short = stage.get("label") or stage.get("name"), stage.get("name")
        description = stage.get("description") or (
            f"Each run's {label}, tested by the same evaluator on the same split: a paired baseline per seed.")
        lines += ([] if not lines else [""]) + [
            f"### {dataset}: {m} vs its own {label}", "",
            f"{description} Mean ± std over seeds; relative difference of the means and a two-sided paired "
            f"t-test over the seeds. Other models are paired with the {label} of the same seed. {CI_SENTENCE} "
            f"{family.sentence()}", "",
            f"| Model ({family.header()}) | n | " + " | ".join(_mean_header(_metric_label(k)) for k in metrics) + " |",
            "|---|---|" + "---|" * len(metrics)]
        base_by_seed = {r["seed"]: staged(r) for r in cells}
        ours_by_seed = {r["seed"]: r["test"] for r in cells}
        what = f"vs {short}"
        seeds, ours, base, comp = _paired_rows(ours_by_seed, base_by_seed, metrics, family,
                                               (what, dataset, m, f"{m} {short}"))
        lines.append(f"| {m} {label} | {len(cells)} | " + " | ".join(base) + " |")
        lines.append(f"| {m} | {len(seeds)} | " + " | ".join(ours) + " |")
        lines.append(f"| {m} vs {label} | | " + " | ".join(comp) + " |")
        for other in study.models:
            if other in with_stage:
                continue
            by_seed = {r["seed"]: r["test"] for r in finished if r["model"] == other}
            seeds, theirs, _, comp = _paired_rows(by_seed, base_by_seed, metrics, family,
                                                  (what, dataset, other, f"{m} {short}"))
            if not seeds:
                continue
            lines.append(f"| {other} | {len(seeds)} | " + " | ".join(theirs) + " |")
            lines.append(f"| {other} vs {m} {label} (same seed) | | " + " | ".join(comp) + " |")
    return "\n".join(lines + [""]) if lines else ""


def within_seed_noise(c):
    """Whether a paired comparison (:func:`_paired_metric`, ``a`` a variant, ``b`` its base model) is
    within seed noise: p >= 0.05 (the adjusted p, ``c["p_adj"]``, when there is one) and the
    difference of the means at most one std of ``b``; None when it cannot be told (fewer than 2 pairs)."""
    if c["n"] and c["identical"]:
        return True
    if c["n"] < 2 or c["p"] is None:
        return None
    p = c["p_adj"] if c.get("p_adj") is not None else c["p"]
    return p >= 0.05 and abs(c["a"][0] - c["b"][0]) <= c["b"][1]


def variants_table(study, rows, dataset, metrics, family=None):
    """Markdown: each variant whose model is also in the study against that model, paired per
    seed, with the wall time per cell of both and whether the variant is within seed noise of
    it; '' when there is no such variant. ``family``: as in :func:`dataset_table`."""
    return _in_family(study, family, lambda fam: _variants_table(study, rows, dataset, metrics, fam))


def _variants_table(study, rows, dataset, metrics, family):
    pairs = [(v, study.model_of(v)) for v in study.variants if study.model_of(v) in study.models]
    if not pairs:
        return ""
    finished = [r for r in rows if r["dataset"] == dataset and r["status"] == "finished"]
    labels = [_metric_label(k) for k in metrics]
    differences = {v: ", ".join(f"{k}: {new}" for k, _, new in
                                _dict_changes(study.cell_overrides(dataset, m), study.cell_overrides(dataset, v)))
                   for v, m in pairs}
    lines = [f"### {dataset}: variants vs their base model", "",
             "; ".join(f"{v}: {m} with `{differences[v] or 'the same config'}`" for v, m in pairs)
             + ". Test metrics, mean ± std over the seeds both finished (n); relative difference of the means "
             "(positive: the variant is better) and a two-sided paired t-test over those seeds "
             f"(scipy.stats.ttest_rel); seconds per training epoch (each cell's median over its epochs, training "
             f"pass only) and wall time of the cells, shortest-longest. {CI_SENTENCE} "
             + family.sentence(), "",
             f"| Model ({family.header()}) | n | " + " | ".join(map(_mean_header, labels))
             + " | s / training epoch | wall time / cell |",
             "|---|---|" + "---|" * len(labels) + "---|---|"]
    verdicts = []
    for variant, base in pairs:
        ours, theirs = ({r["seed"]: r for r in finished if r["model"] == m} for m in (variant, base))
        seeds = sorted(set(ours) & set(theirs))
        comparisons = [_paired_metric({s: r["test"] for s, r in ours.items()},
                                      {s: r["test"] for s, r in theirs.items()}, k) for k in metrics]
        _adjust_all(comparisons, metrics, family, ("variant vs base", dataset, variant, base))
        lines += [f"| {base} | {len(seeds)} | " + " | ".join(_fmt_mean_std(*c["b"], c["n"]) for c in comparisons)
                  + f" | {_epoch_time_text([theirs[s] for s in seeds])} | {_wall_text([theirs[s] for s in seeds])} |",
                  f"| {variant} | {len(seeds)} | " + " | ".join(_fmt_mean_std(*c["a"], c["n"]) for c in comparisons)
                  + f" | {_epoch_time_text([ours[s] for s in seeds])} | {_wall_text([ours[s] for s in seeds])} |",
                  f"| {variant} vs {base} | | " + " | ".join(_comparison_text(c, family) for c in comparisons)
                  + " | | |"]
        noise = {label: within_seed_noise(c) for c, label in zip(comparisons, labels)}
        inside = [label for label, v in noise.items() if v]
        outside = [label for label, v in noise.items() if v is False]
        if not inside and not outside:
            verdicts.append(f"- {variant}: fewer than 2 seeds finished by both it and {base}: no verdict.")
        elif not outside:
            verdicts.append(f"- {variant}: within seed noise of {base} on every metric.")
        else:
            verdicts.append(f"- {variant}: **not** within seed noise of {base} on {', '.join(outside)}"
                            + (f"; within it on {', '.join(inside)}." if inside else "."))
    adjusted = f", using the adjusted {family.label}" if family.label else ""
    lines += ["", f"Within seed noise: the paired t-test finds no difference (p ≥ 0.05{adjusted}) and the difference "
              "of the means is at most one standard deviation of the base model over these seeds.", ""] + verdicts
    return "\n".join(lines + [""])


def write_report(study, rows=None):
    """Write cells.csv/json, tables/<dataset>.md, results.md and plots/; returns their paths."""
    rows = rows if rows is not None else collect_cells(study)
    out = study.output_dir
    metrics = _report_metrics(study, rows)
    paths = {"cells_csv": os.path.join(out, "cells.csv"), "cells_json": os.path.join(out, "cells.json"),
             "results_md": os.path.join(out, "results.md"), "tables": {}, "plots": []}
    write_text_atomic(paths["cells_csv"], _csv_text(rows))
    _write_json(paths["cells_json"], {"study": study.name, "source": study.source, "cells": rows})

    def tables(d, d_rows, family):
        text, summary = dataset_table(study, d_rows, d, metrics, family)
        for extra in (stage_table(study, d_rows, d, metrics, family),
                      variants_table(study, d_rows, d, metrics, family), slices_table(study, d_rows, d, metrics)):
            if extra:
                text += "\n" + extra
        return text, summary

    levels = getattr(study, "sparsity", None)

    def parts(d):
        """``(label, file stem, rows)`` of each part of dataset ``d``'s report: the dataset, or (sparsity
        axis) one part per level, labelled "<dataset>, keep <level>", whose rows carry that label."""
        if levels is None:
            return [(d, d, rows)]
        return [(f"{d}, keep {k:g}", f"{d}_{level_name(k)}",
                 [dict(r, dataset=f"{d}, keep {k:g}") for r in rows if r["dataset"] == d and r.get("sparsity") == k])
                for k in sorted(levels, reverse=True)]

    def links(plots):
        return "\n" + " ".join(f"![{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in plots) + "\n"

    # every p-value of the report is one family: a first pass collects them, the second shows them adjusted
    family = PFamily(getattr(study, "p_adjust", "holm"), scope="report")
    for d in study.datasets:
        for label, _, d_rows in parts(d):
            tables(label, d_rows, family)
    family.close()
    paths["p_adjust"] = {"method": family.method, "family_size": family.size}
    sections, summaries = [], {}
    for d in study.datasets:
        file_parts, md_parts = [], []
        if levels is not None:
            text, curves = sparsity_table(study, rows, d, metrics)
            file_parts.append(text)
            plot = None
            with contextlib.suppress(ImportError):
                plot = plot_sparsity(study, curves, d, os.path.join(out, "plots", f"{d}_sparsity.png"))
            if plot:
                paths["plots"].append(plot)
                text += links([plot])
            md_parts.append(text)
        for label, stem, d_rows in parts(d):
            text, summary = tables(label, d_rows, family)
            summaries[label] = summary
            file_parts.append(text)
            plots = []
            with contextlib.suppress(ImportError):
                p1 = plot_metrics(study, summary, label, metrics, os.path.join(out, "plots", f"{stem}_metrics.png"))
                p2 = plot_valid_curves(study, d_rows, label, os.path.join(out, "plots", f"{stem}_valid.png"))
                plots = [p for p in (p1, p2) if p]
            paths["plots"] += plots
            if plots:
                text += links(plots)
            md_parts.append(text)
        table_path = os.path.join(out, "tables", f"{d}.md")
        write_text_atomic(table_path, "\n".join(file_parts) + "\n")
        paths["tables"][d] = table_path
        sections.append("\n".join(md_parts))

    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    info = machine_info()
    md = [f"# Study `{study.name}`", ""]
    if study.description:
        md += [str(study.description).strip(), ""]
    md += [f"- study file: `{study.source}`",
           f"- written: {datetime.datetime.now().isoformat(timespec='seconds')}",
           f"- cells: {len(rows)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})",
           f"- datasets: {', '.join(study.datasets)}; models: {', '.join(study.models)}; "
           f"seeds: {', '.join(map(str, study.seeds))}"
           + ("" if levels is None else f"; sparsity levels (fraction of the training data kept): "
                                        f"{', '.join(f'{k:g}' for k in levels)}"),
           _cells_ran_on(rows),
           f"- statistics: means ± std with the {CI_LEVEL:.0%} t confidence interval's half-width over the seeds; "
           "two-sided paired t-tests over seeds, "
           + (f"p-values adjusted by {P_ADJUST_FULL_NAMES[family.method]} ({family.label}) over the "
              f"{family.size} tested comparisons of this report, raw p next to them"
              if family.label else "p-values not adjusted for multiple comparisons")
           + f" (`p_adjust: {family.method}`)",
           f"- report written on machine: {info.get('host')}; {info.get('cpu')} ({info.get('cpu_count')} logical CPUs"
           + (f", {info['memory_gb']} GiB RAM" if info.get("memory_gb") else "") + f"); GPU: {info.get('gpu') or 'none'}; "
           f"{info.get('platform')}; Python {info.get('python')}, torch {info.get('torch')}, "
           f"RecBole {info.get('recbole')}", ""]
    md += sections
    md += ["## Wall time per cell", "",
           "Wall time: the cell's process from start to end (imports, data, training, test), summed over "
           "its attempts when it was interrupted and resumed; train: `timings_s.train` of the run record "
           "(the last attempt); s / epoch: the median training pass over its epochs (evaluation not "
           "included; records written since 2026-12-04).", "",
           "| Dataset | Model | Seed | " + ("" if levels is None else "Keep | ")
           + "Status | Device | Epochs | Attempts | Train (s) | s / epoch | Wall time (s) |",
           "|---|---|---|" + ("" if levels is None else "---|") + "---|---|---|---|---|---|---|"]
    total = 0.0
    for r in rows:
        if r["wall_time_s"] is not None:
            total += r["wall_time_s"]
        keep = "" if levels is None else f"{r['sparsity']:g} | "
        md.append(f"| {r['dataset']} | {r['model']} | {r['seed']} | {keep}{r['status']} | {r['device'] or '—'} | "
                  f"{_epochs_text([r])} | {r.get('attempts') or '—'} | "
                  f"{_fmt(r['train_time_s'], 1)} | {_fmt(r.get('train_epoch_s'), 1)} | "
                  f"{_fmt(r['wall_time_s'], 1)} |")
    md += ["", f"Total wall time of the finished cells: {total:.1f} s ({total / 3600:.2f} h).", ""]
    failed = [r for r in rows if r["error"]]
    if failed:
        md += ["## Failed cells", ""] + [f"- {cell_text(r['dataset'], r['model'], r['seed'], r.get('sparsity'))}: "
                                         f"{r['error']} "
                                         f"(log: `{r['log']}`)" for r in failed] + [""]
    write_text_atomic(paths["results_md"], "\n".join(md))
    paths["summaries"] = summaries
    return paths


# ============================================================================ entry points


def run_study(path_or_dict, output_dir=None, overrides=None, max_cells=None, progress=True,
              dry_run=False, report_only=False, log=None, jobs=1):
    """Run (or resume) a study; returns a dict with the cells, counts and output paths.

    Args:
        path_or_dict: a study YAML file or the same content as a dict.
        output_dir: the study folder (default: the YAML's ``output_dir`` or ``studies/<name>``).
        overrides: config keys for every cell, beating the YAML (``--key=value`` on the CLI).
        max_cells: run at most this many unfinished cells, then write the report and return.
        progress: show a tqdm bar over cells.
        dry_run: validate and list the cells; run nothing, write nothing.
        report_only: run nothing; rebuild tables, CSV/JSON and plots from the records.
        jobs: cells run at the same time (each its own subprocess; e.g. several cells sharing one
            GPU). Cells start in study order; a feature shared by cells of one dataset is built
            once (the others wait for it).

    Raises:
        StudyError: invalid study (the message names the YAML line), or a finished cell
            whose configuration changed; raised before any cell runs.
    """
    log = log or (lambda msg: print(f"[study] {msg}", file=sys.stderr, flush=True))
    study = validate_study(path_or_dict, output_dir, overrides)
    for warning in study.errors.warnings:
        log(f"warning: {warning}")
    finished = [c for c in study.cells if study.finished_record(*c) is not None]
    if dry_run:
        return {"study": study, "output_dir": study.output_dir, "cells": study.cells,
                "finished": len(finished), "to_build": dict(study.to_build)}
    with _study_lock(study.output_dir), _sigterm_as_interrupt():
        live = {}
        if not report_only:
            _check_finished_specs(study)
            _prepare_datasets(study, log)
            todo = [c for c in study.cells if c not in set(finished)]
            if max_cells is not None:
                todo = todo[: max(0, int(max_cells))]
            log(f"{study.name}: {len(study.cells)} cells, {len(finished)} finished, running {len(todo)}; "
                f"folder {study.output_dir}")
            study.jobs = jobs
            if jobs > 1 and not os.environ.get("OMP_NUM_THREADS"):
                log(f"{jobs} cells at a time: each gets {_cell_threads(jobs)} CPU thread(s) (OMP_NUM_THREADS "
                    "overrides)")
            from tqdm import tqdm

            bar = tqdm(total=len(study.cells), initial=len(finished), desc=study.name, unit="cell",
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            try:
                if jobs <= 1:
                    for cell in todo:
                        bar.set_postfix_str(cell_text(*cell))
                        live[cell] = _run_cell(study, study.cell_spec(*cell), log)
                        bar.update(1)
                        if live[cell] == "interrupted":
                            log("a cell was stopped by a signal: not starting the next ones (run again to resume)")
                            break
                else:
                    _run_cells_parallel(study, todo, jobs, live, bar, log)
            finally:
                bar.close()
                paths = write_report(study, collect_cells(study, live))
        else:
            paths = write_report(study, collect_cells(study))
    rows = _read_json(paths["cells_json"])["cells"]
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"study": study, "output_dir": study.output_dir, "cells": rows, "counts": counts,
            "complete": counts.get("finished", 0) == len(rows), **paths}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="run_recbole_mm.py --study",
        description="Run a YAML study (datasets x models x seeds); any --key=value overrides every cell's config.",
        allow_abbrev=False,
    )
    parser.add_argument("--study", required=False, help="study YAML, e.g. properties/study/quickstart.yaml")
    add_study_options(parser)
    parser.add_argument("--run-cell", dest="run_cell", default=None, help=argparse.SUPPRESS)
    return parser


def add_study_options(parser):
    """The study options (all but ``--study``) on ``parser`` or an argument group; the main
    command's ``--help`` shows them from here, so the two lists cannot drift apart."""
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None, metavar="DIR",
                        help="study folder (default: the YAML's output_dir, else studies/<name>)")
    parser.add_argument("--max-cells", "--max_cells", dest="max_cells", type=int, default=None, metavar="N",
                        help="run at most N unfinished cells, then stop (run again to continue)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="validate and list the cells; run nothing")
    parser.add_argument("--report-only", "--report_only", dest="report_only", action="store_true",
                        help="rebuild tables, CSV/JSON and plots from the finished records")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="cells run at the same time, each in its own process (default 1); "
                             "without OMP_NUM_THREADS each cell gets cores // jobs CPU threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = build_parser().parse_known_args(argv)
    if args.run_cell:
        return _cell_worker(args.run_cell)
    if not args.study:
        print("error: --study <file.yaml> is required", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    overrides, bad = {}, []
    for arg in unknown:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides[key] = _parse_value(value)
        else:
            bad.append(arg)
    if bad:
        print(f"error: unrecognized arguments: {' '.join(bad)} (config overrides are --key=value)", file=sys.stderr)
        return 2
    import recbole_mm  # noqa: F401 - compatibility layer

    try:
        result = run_study(args.study, output_dir=args.output_dir, overrides=overrides,
                           max_cells=args.max_cells, progress=args.progress, dry_run=args.dry_run,
                           report_only=args.report_only, jobs=args.jobs)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StudyTerminated:
        print("study stopped by SIGTERM: finished cells are kept and the report is written; run the same "
              "command again to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    if args.dry_run:
        study = result["study"]
        levels = f" x {len(study.sparsity)} sparsity levels" if study.sparsity is not None else ""
        print(f"study {study.name}: valid; {len(study.cells)} cells ({len(study.datasets)} datasets x "
              f"{len(study.models)} models x {len(study.seeds)} seeds{levels}), {result['finished']} finished; "
              f"folder {study.output_dir}")
        for d, src in result["to_build"].items():
            print(f"  dataset {d} will be built from its {src['type']} source")
        return 0
    counts = result["counts"]
    print(f"study {result['study'].name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"results: {result['results_md']}")
    if counts.get("failed") or counts.get("timeout") or counts.get("config changed"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
