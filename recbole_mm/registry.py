"""Name-based lookup of models, trainers and dataset classes: plugin first, then RecBole.

RecBole's own ``recbole.utils.get_model`` only searches ``recbole.model.*`` and, for an unknown
name, dies with ``ModuleNotFoundError: lightgbm`` while probing its exlib package
(recbole/utils/utils.py, RecBole #1975, #489). Here an unknown name is a one-line
``ValueError`` that lists what exists.
"""

import difflib
import importlib
import importlib.util

# Plugin models: name -> "module:attribute". Imported only when asked for.
PLUGIN_MODELS = {
    "TSSR": "recbole_mm.model.tssr:TSSR",
    "SICSRec": "recbole_mm.model.sicsrec:SICSRec",
    "ContentSASRec": "recbole_mm.model.baselines:ContentSASRec",
    "IDContentSASRec": "recbole_mm.model.baselines:IDContentSASRec",
}

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


def _plugin_available():
    names = []
    for name, target in PLUGIN_MODELS.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


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
    return sorted(_plugin_available()), recbole_sequential_models()


def _load_plugin(name):
    module_name, attr = PLUGIN_MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


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
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"model must be a model name or class, got {name!r}")
    plugin_names = _plugin_available()
    for cand in plugin_names:
        if cand == name:
            return _load_plugin(cand)
    for cand in plugin_names:
        if cand.lower() == name.lower():
            return _load_plugin(cand)
    cls = _load_recbole(name)
    if cls is not None:
        return cls
    plugin, seq = available_models()
    close = difflib.get_close_matches(name, plugin + seq, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown model '{name}'.{hint} recbole_mm models: {', '.join(plugin) or '(none)'}; "
        f"RecBole sequential models: {', '.join(seq)} (any other RecBole model name works too)."
    )


def get_trainer(model_type, model_name):
    """Trainer class: the plugin's, else RecBole's, always with safe checkpoint loading."""
    from recbole_mm import trainer as mm_trainer

    model_name = model_name if isinstance(model_name, str) else model_name.__name__
    try:
        model_class = get_model(model_name)
    except UnknownModelError:
        model_class = None
    own = getattr(model_class, "trainer_class", None)
    if isinstance(own, str):
        module_name, attr = own.split(":")
        own = getattr(importlib.import_module(module_name), attr)
    own = own or getattr(mm_trainer, f"{model_name}Trainer", None)
    if own is not None:
        return mm_trainer.with_safe_loading(own)
    from recbole.utils import get_trainer as recbole_get_trainer

    base = recbole_get_trainer(model_type, model_name)
    return mm_trainer.with_safe_loading(base)


def get_dataset_class(config):
    """Dataset class for ``config``: a model's own ``dataset_class`` attribute, else RecBole's."""
    model_class = get_model(config["model"])
    own = getattr(model_class, "dataset_class", None)
    if own is not None:
        if isinstance(own, str):
            module_name, attr = own.split(":")
            own = getattr(importlib.import_module(module_name), attr)
        return own
    return None
