"""The model protocol: one :class:`ModelSpec` per model, resolved lazily; RecBole's models as the fallback.

A plugin model declares itself in its own module with a module-level tuple of literal specs::

    MODEL_SPECS = (
        ModelSpec(name="TSSR", model="recbole_mm.model.tssr:TSSR", role="proposed", trim_safe=True,
                  dataset="recbole_mm.data.dataset:MultiModalSequentialDataset",
                  features="recbole_mm.model.tssr:TSSR.required_features"),
    )

Every module of ``recbole_mm.model`` is read (parsed, not imported) for ``MODEL_SPECS`` the first
time a name is looked up, so adding a model touches only its own files (docs/ADDING_A_MODEL.md);
the classes behind the ``"module:attribute"`` strings are imported only when asked for, the way
transformers resolves its Auto classes. A model defined outside the package (a user's script)
registers itself with :func:`register`. Any other name is looked up among RecBole's models.

RecBole's own ``recbole.utils.get_model`` only searches ``recbole.model.*`` and, for an unknown
name, dies with ``ModuleNotFoundError: lightgbm`` while probing its exlib package
(recbole/utils/utils.py, RecBole #1975, #489). Here an unknown name is a one-line
``ValueError`` that lists what exists.
"""

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import os
from typing import Optional, Tuple

ROLES = ("baseline", "proposed")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the runner, the trainers, the data pipeline and the study need to know of a model.

    * ``name``: the model's name (``--model=NAME``, ``properties/model/NAME.yaml``);
    * ``model``: ``"module:Class"``, a RecBole ``SequentialRecommender`` subclass;
    * ``dataset``: ``"module:Class"`` of its dataset, or None for RecBole's choice;
    * ``trainer``: ``"module:Class"`` of its trainer, or None for the plugin's ``MMTrainer``
      (RecBole's trainer for RecBole's models); either way with the plugin's checkpoint, resume and
      history (:func:`recbole_mm.trainer.with_safe_loading`). Trainer hooks a multi-stage model can
      fill: ``extra_test_results`` and ``stage_summaries`` (:class:`recbole_mm.trainer.SafeLoadingMixin`);
    * ``role``: ``baseline`` or ``proposed`` (how study reports compare it);
    * ``trim_safe``: its outputs do not depend on right padding beyond a batch's longest history
      (``trim_batches: auto`` trims its batches; tests/test_lazy.py checks each such model);
    * ``features``: ``"module:callable"`` returning the feature names it reads for a config (the
      dataset loads them), or None for the config's ``mm_feature_names``;
    * ``publishers``: ``(("SourceModel", "module:function"), ...)``: after a finished run of
      ``SourceModel`` with a ``share_dir``, ``function(config, trainer, train_data, valid_data,
      best_valid_score, best_valid_result)`` may publish something this model reuses (SICSRec: a
      SASRec run published as its step 1) and returns the path or None;
    * ``test_config``: settings that make the model run on the test suite's tiny data (the shared
      protocol tests, e.g. tests/test_lazy.py and tests/test_model_protocol.py, apply them).
    """

    name: str
    model: str
    dataset: Optional[str] = None
    trainer: Optional[str] = None
    role: str = "baseline"
    trim_safe: bool = False
    features: Optional[str] = None
    publishers: Tuple[Tuple[str, str], ...] = ()
    test_config: Optional[dict] = None
    source: Optional[str] = None  # where the spec was declared (a file), for error messages

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"model {self.name}: role must be one of {ROLES}, got {self.role!r} ({self.source})")
        for field in ("model", "dataset", "trainer", "features"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or value.count(":") != 1):
                raise ValueError(f"model {self.name}: {field} must be 'module:attribute', got {value!r} "
                                 f"({self.source})")


def resolve(target):
    """The object ``"module:attr.sub"`` names (imported now)."""
    module_name, attr = target.split(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _literal_specs(path, source):
    """The literal ``ModelSpec(...)`` calls of the module-level ``MODEL_SPECS`` of ``source`` (``path``'s text)."""
    tree = ast.parse(source, filename=path)
    specs = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        else:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else []
        if not any(isinstance(t, ast.Name) and t.id == "MODEL_SPECS" for t in targets) or node.value is None:
            continue
        calls = node.value.elts if isinstance(node.value, (ast.Tuple, ast.List)) else [node.value]
        for call in calls:
            called = getattr(call.func, "id", getattr(call.func, "attr", None)) if isinstance(call, ast.Call) else None
            if called != "ModelSpec":
                raise ValueError(f"{path}: MODEL_SPECS must hold ModelSpec(...) calls with literal arguments")
            try:
                kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            except ValueError as exc:
                raise ValueError(f"{path}: MODEL_SPECS entries take literal arguments only ({exc})") from None
            specs.append(ModelSpec(source=path, **kwargs))
    return specs


_DISCOVERED = None
_REGISTERED = {}


def _discover():
    """name -> spec of every plugin model (the package's model modules, parsed once)."""
    global _DISCOVERED
    if _DISCOVERED is None:
        found = {}
        spec = importlib.util.find_spec("recbole_mm.model")
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in folders:
            for root, dirs, files in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
                for file in sorted(files):
                    if not file.endswith(".py"):
                        continue
                    path = os.path.join(root, file)
                    with open(path, encoding="utf-8") as f:
                        source = f.read()
                    if "MODEL_SPECS" not in source:
                        continue
                    for s in _literal_specs(path, source):
                        if s.name in found:
                            raise ValueError(f"model {s.name} is declared twice: {found[s.name].source} and {path}")
                        found[s.name] = s
        _DISCOVERED = found
    return _DISCOVERED


def register(spec):
    """Register a model defined outside the package (e.g. in a user's script) for this process;
    a plugin model's name cannot be taken."""
    if not isinstance(spec, ModelSpec):
        raise TypeError("register() takes a ModelSpec")
    if spec.name in _discover():
        raise ValueError(f"model {spec.name} already exists ({_discover()[spec.name].source})")
    _REGISTERED[spec.name] = spec
    return spec


def plugin_specs():
    """name -> :class:`ModelSpec` of the plugin's models (and those registered in this process)."""
    return {**_discover(), **_REGISTERED}


# RecBole models whose outputs do not depend on right padding beyond the longest history of a
# batch (positions from the left, padding masked or never read): tests/test_lazy.py checks each.
TRIM_SAFE_RECBOLE_MODELS = frozenset({"SASRec", "GRU4Rec"})


def get_spec(name):
    """The :class:`ModelSpec` of ``name`` (a plugin model, exact then case-insensitive match, or a
    RecBole model: a baseline resolved to its class), or raises :class:`UnknownModelError`."""
    if isinstance(name, type):
        for spec in plugin_specs().values():
            if spec.model.split(":")[1] == name.__qualname__ and spec.model.split(":")[0] == name.__module__:
                return spec
        return ModelSpec(name=name.__name__, model=f"{name.__module__}:{name.__qualname__}",
                         trim_safe=name.__name__ in TRIM_SAFE_RECBOLE_MODELS and name.__module__.startswith("recbole."))
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"model must be a model name or class, got {name!r}")
    specs = plugin_specs()
    if name in specs:
        return specs[name]
    for cand, spec in specs.items():
        if cand.lower() == name.lower():
            return spec
    cls = _load_recbole(name)
    if cls is not None:
        return ModelSpec(name=cls.__name__, model=f"{cls.__module__}:{cls.__qualname__}",
                         trim_safe=cls.__name__ in TRIM_SAFE_RECBOLE_MODELS)
    plugin, seq = available_models()
    close = difflib.get_close_matches(name, plugin + seq, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown model '{name}'.{hint} recbole_mm models: {', '.join(plugin) or '(none)'}; "
        f"RecBole sequential models: {', '.join(seq)} (any other RecBole model name works too)."
    )


def proposed_models():
    """Names of the plugin's models with ``role: proposed``."""
    return sorted(n for n, s in plugin_specs().items() if s.role == "proposed")


def required_features(config):
    """The feature names the configured model reads (its spec's ``features``), else ``mm_feature_names``."""
    spec = get_spec(config["model"])
    if spec.features:
        return list(resolve(spec.features)(config))
    return list(config["mm_feature_names"] or [])


def publishers_for(model_name):
    """``[(publishing model's name, function)]`` of the specs that reuse runs of ``model_name``."""
    out = []
    for spec in plugin_specs().values():
        for source, target in spec.publishers:
            if source == model_name:
                out.append((spec.name, resolve(target)))
    return out


_RECBOLE_SUBMODULES = [
    "general_recommender",
    "context_aware_recommender",
    "sequential_recommender",
    "knowledge_aware_recommender",
]
# recbole.model.exlib_recommender imports lightgbm and xgboost at package import.
_RECBOLE_EXLIB = {"lightgbm": "LightGBM", "xgboost": "XGBoost"}


class UnknownModelError(ValueError):
    pass


def __getattr__(name):
    if name == "PLUGIN_MODELS":  # name -> "module:Class" of the plugin's models (read-only view)
        return {n: s.model for n, s in plugin_specs().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def recbole_sequential_models():
    """Class names of RecBole's sequential recommenders."""
    import recbole.model.sequential_recommender as seq
    from recbole.model.abstract_recommender import SequentialRecommender

    return sorted(
        n
        for n in dir(seq)
        if isinstance(getattr(seq, n), type)
        and issubclass(getattr(seq, n), SequentialRecommender)
        and getattr(seq, n) is not SequentialRecommender
    )


def available_models():
    """(plugin models, RecBole sequential models), each sorted."""
    return sorted(plugin_specs()), recbole_sequential_models()


def _load_recbole(name):
    if name.lower() in _RECBOLE_EXLIB:
        module = importlib.import_module("recbole.model.exlib_recommender")
        return getattr(module, _RECBOLE_EXLIB[name.lower()])
    for sub in _RECBOLE_SUBMODULES:
        module_path = f"recbole.model.{sub}.{name.lower()}"
        if importlib.util.find_spec(module_path) is not None:
            module = importlib.import_module(module_path)
            if hasattr(module, name):
                return getattr(module, name)
            # case-insensitive class match inside the module (e.g. 'sasrec' -> SASRec)
            for attr in dir(module):
                if attr.lower() == name.lower() and isinstance(getattr(module, attr), type):
                    return getattr(module, attr)
    return None


def get_model(name):
    """Return the model class for ``name`` (a class is returned unchanged).

    Plugin models are found first, then every RecBole model; matching is exact first,
    then case-insensitive.
    """
    if isinstance(name, type):
        return name
    return resolve(get_spec(name).model)


def get_trainer(model_type, model_name):
    """Trainer class: the model spec's, else RecBole's, always with the plugin's safe loading."""
    from recbole_mm import trainer as mm_trainer

    try:
        spec = get_spec(model_name)
    except UnknownModelError:
        spec = None
    if spec is not None and spec.trainer:
        return mm_trainer.with_safe_loading(resolve(spec.trainer))
    from recbole.utils import get_trainer as recbole_get_trainer

    name = model_name if isinstance(model_name, str) else model_name.__name__
    return mm_trainer.with_safe_loading(recbole_get_trainer(model_type, name))


def get_dataset_class(config):
    """Dataset class for ``config``: the model spec's ``dataset``, else None (RecBole's choice)."""
    spec = get_spec(config["model"])
    return resolve(spec.dataset) if spec.dataset else None
