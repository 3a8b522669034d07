"""The model protocol (recbole_mm.registry, docs/ADDING_A_MODEL.md), checked for every plugin model
its spec declares, and the package's layering (each layer imports nothing above it)."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from recbole_mm.registry import (ModelSpec, UnknownModelError, get_dataset_class, get_model, get_spec,  # noqa: E402
                                 get_trainer, plugin_specs, register, resolve)

from conftest import build_tiny, instantiate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = sorted(plugin_specs())


def test_specs_are_found_without_importing_the_models():
    code = ("import sys; from recbole_mm.registry import plugin_specs; names = sorted(plugin_specs()); "
            "print(names, [m for m in sys.modules if m.startswith('recbole_mm.model')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    names, loaded = out.stdout.strip().rsplit("] [", 1)
    assert "TSSR" in names and "SICSRec" in names
    assert loaded.strip("[]'\n") == ""  # parsed, not imported


@pytest.mark.parametrize("name", PLUGIN)
def test_every_spec_resolves(name):
    spec = get_spec(name)
    assert spec.name == name and spec.role in ("baseline", "proposed")
    assert get_model(name) is resolve(spec.model)
    for target in (spec.dataset, spec.trainer, spec.features):
        if target:
            assert resolve(target) is not None
    for source, target in spec.publishers:
        assert callable(resolve(target)) and get_spec(source)
    assert get_spec(name.lower()) is spec  # case-insensitive, as on the command line


@pytest.mark.parametrize("name", PLUGIN)
def test_every_model_trains_a_step_and_scores_every_item(workdir, name):
    spec = get_spec(name)
    config, dataset, (train, _, test) = build_tiny(workdir, name, **(spec.test_config or {}))
    if spec.dataset:
        assert isinstance(dataset, resolve(spec.dataset))
    assert get_dataset_class(config) is (resolve(spec.dataset) if spec.dataset else None)
    model = instantiate(config, train, get_model(name))
    trainer = get_trainer(config["MODEL_TYPE"], name)(config, model)
    assert hasattr(trainer, "extra_test_results") and hasattr(trainer, "stage_summaries")
    model.train()
    loss = model.calculate_loss(next(iter(train)))
    terms = loss if isinstance(loss, tuple) else (loss,)
    if hasattr(model, "loss_names"):
        assert len(model.loss_names) == len(terms)
    total = sum(terms)
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    batch = next(iter(test))[0]
    with torch.no_grad():
        scores = model.full_sort_predict(batch).view(len(batch), -1)
    assert scores.shape == (len(batch), dataset.item_num) and torch.isfinite(scores[:, 1:]).all()


def test_recbole_models_are_the_fallback_and_unknown_names_say_what_exists():
    spec = get_spec("SASRec")
    assert spec.role == "baseline" and spec.trim_safe and spec.dataset is None
    assert get_spec("GRU4Rec").trim_safe and not get_spec("BERT4Rec").trim_safe
    with pytest.raises(UnknownModelError, match="Did you mean TSSR"):
        get_spec("TSRR")


def test_a_model_outside_the_package_registers_itself():
    from recbole_mm import registry

    spec = ModelSpec(name="MyOwnSASRec", model="recbole.model.sequential_recommender.sasrec:SASRec", trim_safe=True)
    try:
        register(spec)
        assert get_spec("MyOwnSASRec") is spec and "MyOwnSASRec" in registry.available_models()[0]
        with pytest.raises(ValueError, match="already exists"):
            register(ModelSpec(name="TSSR", model="x:y"))
    finally:
        registry._REGISTERED.pop("MyOwnSASRec", None)
    with pytest.raises(ValueError, match="role must be one of"):
        ModelSpec(name="X", model="a:b", role="main")
    with pytest.raises(ValueError, match="'module:attribute'"):
        ModelSpec(name="X", model="a.b.C")


def test_a_moved_model_keeps_its_old_names():
    """SICSRec moved from three modules into a package: what checkpoints pickled (a Config holds the
    model class, a saved dataset its class) and what scripts import still resolves, to the same objects,
    and the spec found by class is SICSRec's."""
    import pickle

    from recbole_mm.model import sicsrec_pairs, sicsrec_stage1
    from recbole_mm.model.sicsrec import SICSRec, SICSRecTrainer, publish_step1
    from recbole_mm.model.sicsrec import dataset, pairs, trainer

    assert pickle.loads(b"crecbole_mm.model.sicsrec\nSICSRec\n.") is SICSRec
    assert pickle.loads(b"crecbole_mm.model.sicsrec_stage1\nSICSRecDataset\n.") is dataset.SICSRecDataset
    assert pickle.loads(pickle.dumps(SICSRec)) is SICSRec and SICSRecTrainer is trainer.SICSRecTrainer
    assert get_spec(SICSRec).name == "SICSRec" and get_model("SICSRec") is SICSRec
    assert resolve(get_spec("SICSRec").publishers[0][1]) is publish_step1
    assert sicsrec_stage1.main.__module__ == "recbole_mm.model.sicsrec.cli"
    assert sicsrec_pairs.LLMPairMiner is pairs.LLMPairMiner and sicsrec_stage1.stage1_pairs is pairs.stage1_pairs


def test_moved_feature_modules_keep_their_old_names():
    """Feature extraction and the feature store moved from data/extract.py and data/features.py into the
    package recbole_mm.features: the old modules still hold every public name (and the private ones
    other code imports), as the same objects."""
    from recbole_mm import features
    from recbole_mm.data import extract as old_extract, features as old_features
    from recbole_mm.features import align, chunks, extract, item_file, store, text

    for old in (old_extract, old_features):
        assert old.__all__ and all(getattr(old, name) is getattr(features, name) for name in old.__all__)
    assert all(hasattr(features, name) for name in features.__all__)
    assert old_extract._extract_features is extract._extract_features and old_extract._save_chunk is chunks._save_chunk
    assert old_extract._read_atomic_file is item_file._read_atomic_file and old_extract.encode_texts is text.encode_texts
    assert old_features._check_unique is store._check_unique and old_features._gather is align._gather


# ----------------------------------------------------------------------------- layering
# data -> encoders (content encoders in the graph) -> models -> trainers -> runner -> study / tune -> CLI: each layer, imported alone in a fresh
# interpreter, loads no module of a layer above it (the registry resolves models by name at run time)
# every module a plugin model's spec names is checked: the trainer of its own that a spec names in the
# trainer layer (with the model module when both are one module), the model, dataset, features and
# publisher modules in the model layer
_TRAINER_MODULES = sorted({s.trainer.split(":")[0] for s in plugin_specs().values() if s.trainer})
_MODEL_MODULES = sorted({target.split(":")[0] for s in plugin_specs().values()
                         for target in (s.model, s.dataset, s.features, *(t for _, t in s.publishers))
                         if target and target.startswith("recbole_mm.model.")} - set(_TRAINER_MODULES))
# a model split into a package (SICSRec): the package, each of its modules, and the old module names kept
# for compatibility (the package's __init__ resolves its names on first use, so importing one of its model
# modules does not load its trainer)
_SICSREC_DIR = os.path.join(REPO, "recbole_mm", "model", "sicsrec")
_PACKAGE_MODULES = sorted({"recbole_mm.model.sicsrec", "recbole_mm.model.sicsrec_stage1",
                           "recbole_mm.model.sicsrec_pairs"}
                          | {f"recbole_mm.model.sicsrec.{f[:-3]}" for f in os.listdir(_SICSREC_DIR)
                             if f.endswith(".py") and f != "__init__.py"})
# frozen item features (recbole_mm/features/, and the former modules data.extract / data.features) are data
_FEATURES_DIR = os.path.join(REPO, "recbole_mm", "features")
_FEATURE_MODULES = sorted({"recbole_mm.features", "recbole_mm.data.extract", "recbole_mm.data.features"}
                          | {f"recbole_mm.features.{f[:-3]}" for f in os.listdir(_FEATURES_DIR)
                             if f.endswith(".py") and f != "__init__.py"})
LAYERS = [
    ("base", ["recbole_mm.registry", "recbole_mm.utils"]),
    ("data", ["recbole_mm.data.dataset", "recbole_mm.data.lazy"] + _FEATURE_MODULES),
    ("encoders", ["recbole_mm.encoders", "recbole_mm.encoders.text", "recbole_mm.encoders.image",
                  "recbole_mm.encoders.lora"]),
    ("model", sorted((set(_MODEL_MODULES) | set(_PACKAGE_MODULES)) - set(_TRAINER_MODULES))),
    ("trainer", ["recbole_mm.trainer"] + _TRAINER_MODULES),
    ("runner", ["recbole_mm.quick_start"]),
    ("study", ["recbole_mm.study", "recbole_mm.tune"]),
]
_ABOVE = {
    "base": ["recbole_mm.data", "recbole_mm.features", "recbole_mm.encoders", "recbole_mm.model", "recbole_mm.trainer", "recbole_mm.quick_start", "recbole_mm.study",
             "recbole_mm.tune", "recbole_mm.__main__"],
    "data": ["recbole_mm.encoders", "recbole_mm.model", "recbole_mm.trainer", "recbole_mm.quick_start", "recbole_mm.study", "recbole_mm.tune",
             "recbole_mm.__main__"],
    "encoders": ["recbole_mm.model", "recbole_mm.trainer", "recbole_mm.quick_start", "recbole_mm.study",
                 "recbole_mm.tune", "recbole_mm.__main__"],
    "model": ["recbole_mm.trainer", "recbole_mm.quick_start", "recbole_mm.study", "recbole_mm.tune", "recbole_mm.__main__"],
    "trainer": ["recbole_mm.quick_start", "recbole_mm.study", "recbole_mm.tune", "recbole_mm.__main__"],
    "runner": ["recbole_mm.study", "recbole_mm.tune", "recbole_mm.__main__"],
    "study": ["recbole_mm.__main__"],
}


def test_each_layer_imports_nothing_above_it():
    modules = [m for _, group in LAYERS for m in group]
    code = ("import importlib, json, sys\n"
            "name = sys.argv[1]\n"
            "importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('recbole_mm'))))\n")
    layer_of = {m: layer for layer, group in LAYERS for m in group}
    problems = []
    for module in modules:
        out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, cwd=REPO,
                             timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert out.returncode == 0, f"{module}: {out.stderr[-2000:]}"
        loaded = json.loads(out.stdout.strip().splitlines()[-1])
        above = _ABOVE[layer_of[module]]
        bad = [m for m in loaded if m != module and any(m == a or m.startswith(a + ".") for a in above)
               and layer_of.get(m) != layer_of[module]]
        if bad:
            problems.append(f"{module} ({layer_of[module]}) loads {bad}")
    assert not problems, "\n".join(problems)
