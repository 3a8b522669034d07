"""Small helpers shared by every layer (imports nothing else of the plugin, and not torch).

* :func:`dist_rank_world`: (rank, world size) of a running ``torch.distributed`` group;
* :func:`jsonable`: a value made JSON-serialisable (records, manifests, checkpoints' metadata);
* :func:`lazy_exports`: a package's ``__getattr__`` / ``__dir__`` that import a name's module on first use.
"""

import importlib
import sys


def dist_rank_world():
    """(global rank, world size) of an initialised ``torch.distributed`` group, else (0, 1); never
    imports torch (a process that has not imported ``torch.distributed`` has no group)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def jsonable(value):
    """``value`` with dicts' keys as strings, tuples as lists, 0-d arrays / tensors as numbers and
    anything else unknown as its ``str``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return str(value)


def lazy_exports(package, exports, namespace):
    """``(__getattr__, __dir__)`` for package ``package`` (its ``__name__``) whose names live in its
    submodules: ``exports`` maps each name to its submodule; a name is imported on first use and
    kept in ``namespace`` (the package's ``globals()``), so importing the package loads none of them."""
    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
