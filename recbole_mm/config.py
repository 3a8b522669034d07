"""``MMConfig``: RecBole's ``Config`` with plugin model lookup and plugin property files.

Priority, lowest first (RecBole's own order, with the plugin's files slotted in):

1. RecBole's ``overall.yaml`` and quick-start defaults for the model type
2. the plugin's ``properties/overall.yaml`` (sequential defaults: CE, full ranking, LOO by time)
3. RecBole's ``properties/model/<Model>.yaml`` (so a RecBole model keeps its own defaults)
4. RecBole's ``sample.yaml`` / ``properties/dataset/<dataset>.yaml``
5. the plugin's ``properties/model/<Model>.yaml``, then the dataset's YAML: the first of
   ``./properties/dataset/<dataset>.yaml``, ``<data_path>/<dataset>/<dataset>.yaml`` and the
   packaged ``properties/dataset/<dataset>.yaml`` (:func:`dataset_config_candidates`)
6. user config files < ``config_dict`` < command line (RecBole's external priority)
"""

import os
from importlib import resources

from recbole.config import Config

from recbole_mm import compat
from recbole_mm.atomic import copy_file_atomic
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
        copy_file_atomic(os.path.join(src, fname), dst)
    return True


def dataset_config_candidates(dataset, data_path="dataset/"):
    """Paths searched for a dataset's YAML, first found wins.

    1. ``./properties/dataset/<name>.yaml`` (relative to the working directory),
    2. ``<data_path>/<name>/<name>.yaml`` (next to the data; written by ``run_recbole_mm.py inspect
       --write-config``),
    3. the plugin's packaged ``properties/dataset/<name>.yaml`` (ml-100k, Bili_*).

    The file found is read at the dataset-YAML level of the priority order: it overrides the
    defaults, and user config files, ``config_dict`` and the command line override it.
    """
    return [
        os.path.join("properties", "dataset", f"{dataset}.yaml"),
        os.path.join(os.fspath(data_path or "dataset/"), str(dataset), f"{dataset}.yaml"),
        os.path.join(properties_dir(), "dataset", f"{dataset}.yaml"),
    ]


class MMConfig(Config):
    """RecBole ``Config`` that finds plugin models and reads the plugin's YAML defaults.

    The user's settings are checked when it is built, before any data is loaded
    (:func:`recbole_mm.validate.validate_config`: unknown keys with "did you mean", wrong types,
    non-positive budgets, a ``valid_metric`` that is not computed); config files must exist and
    parse (errors name the file and line). ``validate=False`` skips the settings check (a study
    validates its own files with their line numbers).
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, validate=True):
        self.config_file_lines = {}
        super().__init__(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
        if validate:
            from recbole_mm.validate import validate_config

            validate_config(self, self.config_file_lines)
            self._check_dataset_config_keys()

    def _load_config_files(self, file_list):
        from recbole_mm.validate import load_config_files

        # RecBole's loop (its YAML loader), with each file checked; an empty file is an empty mapping
        file_config_dict, self.config_file_lines = load_config_files(file_list, loader=self.yaml_loader)
        return file_config_dict

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
        self.dataset_config_file = self.find_dataset_config(dataset)
        layers = [
            os.path.join(props, "overall.yaml"),
            os.path.join(recbole_props, "model", f"{model}.yaml"),
            os.path.join(recbole_props, "dataset", f"{dataset}.yaml"),
            os.path.join(props, "model", f"{model}.yaml"),
        ]
        self.plugin_config_files = []
        for path in layers + ([self.dataset_config_file] if self.dataset_config_file else []):
            if os.path.isfile(path):
                loaded = self._update_internal_config_dict(path)
                if path.startswith(props) or path == self.dataset_config_file:
                    self.plugin_config_files.append(path)
                if path == self.dataset_config_file:
                    self.dataset_config_keys = list(loaded or {})
                if loaded and (path == self.dataset_config_file or path == layers[2]):
                    self.parameters["Dataset"] += [
                        k for k in loaded if k not in self.parameters["Dataset"]
                    ]

    def _check_dataset_config_keys(self):
        """Unknown keys in a user's dataset YAML (found on the search path, not a packaged one) stop
        the run like those of any user config file (``strict_config_keys: False``: a warning)."""
        path = self.dataset_config_file
        if not path or os.path.realpath(path).startswith(os.path.realpath(properties_dir()) + os.sep):
            return
        from recbole_mm.validate import check_keys, known_keys

        strict = self["strict_config_keys"] is not False
        for text in check_keys(getattr(self, "dataset_config_keys", ()), known_keys(None), path, strict):
            import logging

            logging.getLogger(__name__).warning(text + " (strict_config_keys: False, so it is ignored)")

    def _user_data_path(self):
        """The folder holding the dataset folders (``data_path`` before the dataset name is added)."""
        return self.external_config_dict.get("data_path") or self.internal_config_dict.get("data_path") \
            or "dataset/"

    def dataset_config_candidates(self, dataset):
        """Where the dataset's YAML is looked for, first found wins (see :func:`dataset_config_candidates`)."""
        return dataset_config_candidates(dataset, self._user_data_path())

    def find_dataset_config(self, dataset):
        """The dataset YAML this config reads (``None``: there is none); see :func:`dataset_config_candidates`."""
        for path in self.dataset_config_candidates(dataset):
            if os.path.isfile(path):
                return os.path.abspath(path)
        return None

    def __str__(self):
        text = super().__str__()
        used = getattr(self, "dataset_config_file", None)
        tried = ", ".join(self.dataset_config_candidates(self.dataset))
        text += (f"dataset config: {used}\n\n" if used
                 else f"dataset config: none (looked for {tried})\n\n")
        return text

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

    # ------------------------------------------------------------------ distributed
    def _init_device(self):
        """RecBole's device set-up, with a backend that fits the device.

        RecBole 1.2.1 (configurator.py:476-515) always initialises NCCL on ``cuda:local_rank``,
        so DDP cannot run on CPU. Here the backend is chosen from the device (``ddp_backend:
        auto``: NCCL on GPUs, gloo on CPU) and may be forced (``ddp_backend: gloo|nccl``); the
        rank is ``local_rank + offset`` as in RecBole; ranks other than global rank 0 log errors
        only. ``use_gpu: False`` keeps a run on the CPU even where CUDA is available.
        """
        import torch

        cfg = self.final_config_dict
        if isinstance(cfg["gpu_id"], (tuple, list)):
            cfg["gpu_id"] = ",".join(map(str, cfg["gpu_id"]))
        else:
            cfg["gpu_id"] = "" if cfg["gpu_id"] is None else str(cfg["gpu_id"])
        gpu_id = cfg["gpu_id"]
        wants_gpu = cfg.get("use_gpu", True) is not False and len(gpu_id) > 0
        if "local_rank" not in cfg:
            super()._init_device()
            if not wants_gpu:
                cfg["device"] = torch.device("cpu")
            return

        import torch.distributed as dist

        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
        use_cuda = wants_gpu and torch.cuda.is_available()
        backend = str(cfg.get("ddp_backend") or "auto").lower()
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        if backend not in ("nccl", "gloo", "mpi", "ucc"):
            raise ValueError(f"ddp_backend must be auto, nccl, gloo, mpi or ucc, got {backend!r}")
        if backend == "nccl" and not use_cuda:
            raise ValueError("ddp_backend: nccl needs CUDA GPUs (none visible, or use_gpu/gpu_id "
                             "disable them); use ddp_backend: gloo (or auto) to train on CPU")
        local_rank = int(cfg["local_rank"])
        nproc = int(cfg.get("nproc") or 1)
        offset = int(cfg.get("offset") or 0)
        world_size = int(cfg.get("world_size") or nproc)
        if use_cuda:
            n_ids = len(gpu_id.split(","))
            if n_ids < nproc:
                raise ValueError(
                    f"{nproc} processes per node but gpu_id lists {n_ids} GPU(s) ({gpu_id!r}); "
                    f"pass --gpu_id={','.join(str(i) for i in range(nproc))} (one GPU per process)"
                )
            cfg["device"] = torch.device("cuda", local_rank)
            torch.cuda.set_device(local_rank)
        else:
            cfg["device"] = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                rank=local_rank + offset,
                world_size=world_size,
                init_method=f"tcp://{cfg.get('ip') or 'localhost'}:{cfg.get('port') or 5678}",
            )
        elif dist.get_world_size() != world_size:
            raise RuntimeError(f"a process group of size {dist.get_world_size()} already exists; "
                               f"this config asks for world_size {world_size}")
        cfg["ddp_backend"] = backend
        cfg["world_size"] = world_size
        cfg["single_spec"] = False
        if local_rank + offset != 0:
            cfg["state"] = "error"
            cfg["show_progress"] = False
            cfg["verbose"] = False
