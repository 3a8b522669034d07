"""``MMConfig``: RecBole's ``Config`` with plugin model lookup and plugin property files.

Priority, lowest first (RecBole's own order, with the plugin's files slotted in):

1. RecBole's ``overall.yaml`` and quick-start defaults for the model type
2. the plugin's ``properties/overall.yaml`` (sequential defaults: CE, full ranking, LOO by time)
3. RecBole's ``properties/model/<Model>.yaml`` (so a RecBole model keeps its own defaults)
4. RecBole's ``sample.yaml`` / ``properties/dataset/<dataset>.yaml``
5. the plugin's ``properties/model/<Model>.yaml``, then ``properties/dataset/<dataset>.yaml``
6. user config files < ``config_dict`` < command line (RecBole's external priority)
"""

import os
import shutil
from importlib import resources

from recbole.config import Config

from recbole_mm import compat
from recbole_mm.registry import get_model

compat.apply()


def properties_dir():
    """Folder holding the plugin's YAML defaults (installed as ``recbole_mm.properties``)."""
    try:
        path = resources.files("recbole_mm.properties")
        path = os.fspath(path)
        if os.path.isfile(os.path.join(path, "overall.yaml")):
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    # running from a source checkout without installing
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(here), "properties")


def _builtin_dataset_dir(name):
    import recbole

    path = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", name)
    return path if os.path.isdir(path) else None


def materialize_builtin_dataset(name, target_dir):
    """Copy a dataset RecBole ships (ml-100k) into ``target_dir`` once, atomically.

    RecBole itself reads ml-100k from inside site-packages and ignores ``data_path``; the
    plugin copies it next to the user's other datasets so extracted features are cached in
    the user's folder, not inside the installed package.
    """
    src = _builtin_dataset_dir(name)
    if src is None:
        return False
    os.makedirs(target_dir, exist_ok=True)
    for suffix in ("inter", "item", "user"):
        fname = f"{name}.{suffix}"
        dst = os.path.join(target_dir, fname)
        if os.path.exists(dst) or not os.path.exists(os.path.join(src, fname)):
            continue
        tmp = f"{dst}.tmp{os.getpid()}"
        shutil.copyfile(os.path.join(src, fname), tmp)
        os.replace(tmp, dst)
    return True


class MMConfig(Config):
    """RecBole ``Config`` that finds plugin models and reads the plugin's YAML defaults."""

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise KeyError(
                    "model must be given: as an argument, in a config file, in config_dict "
                    "or on the command line (--model=SASRec)"
                )
        model_class = get_model(model)
        model_name = model if isinstance(model, str) and model == model_class.__name__ else model_class.__name__
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise KeyError(
                    "dataset must be given: as an argument, in a config file, in config_dict "
                    "or on the command line (--dataset=ml-100k)"
                )
        return model_name, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        recbole_props = os.path.join(
            os.path.dirname(os.path.realpath(__import__("recbole.config.configurator", fromlist=["x"]).__file__)),
            "..",
            "properties",
        )
        layers = [
            os.path.join(props, "overall.yaml"),
            os.path.join(recbole_props, "model", f"{model}.yaml"),
            os.path.join(recbole_props, "dataset", f"{dataset}.yaml"),
            os.path.join(props, "model", f"{model}.yaml"),
            os.path.join(props, "dataset", f"{dataset}.yaml"),
        ]
        self.plugin_config_files = []
        for path in layers:
            if os.path.isfile(path):
                loaded = self._update_internal_config_dict(path)
                if path.startswith(props):
                    self.plugin_config_files.append(path)
                if loaded and path.endswith(os.path.join("dataset", f"{dataset}.yaml")):
                    self.parameters["Dataset"] += [
                        k for k in loaded if k not in self.parameters["Dataset"]
                    ]

    def _set_default_parameters(self):
        super()._set_default_parameters()
        if _builtin_dataset_dir(self.dataset) is not None:
            # RecBole hard-wires ml-100k to its own package folder; use the user's data_path.
            base = self.external_config_dict.get("data_path") or self.internal_config_dict.get(
                "data_path", "dataset/"
            )
            target = os.path.join(base, self.dataset)
            if not os.path.exists(os.path.join(target, f"{self.dataset}.inter")):
                materialize_builtin_dataset(self.dataset, target)
            self.final_config_dict["data_path"] = target
