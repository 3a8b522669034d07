"""Every workaround recbole_mm needs to run RecBole 1.2.1 on today's numpy / pandas / torch.

Applied once, on ``import recbole_mm`` (before any RecBole ``Config`` is built). Nothing in
RecBole's files is patched on disk. See ``../shared/reference/RECBOLE_NOTES.md`` section 2
for the full breakage table; each item below names the RecBole file and the upstream issue.
"""

import builtins
import importlib.abc
import sys
import types
import warnings

import numpy as np

_APPLIED = False


def _check_pandas():
    # recbole/data/dataset/dataset.py:1217 (_remap) crashes on any token_seq field under
    # pandas >= 3 and its chained fillna(inplace=True) silently stops working (no upstream fix).
    import pandas as pd

    major = int(pd.__version__.split(".")[0])
    if major >= 3:
        raise ImportError(
            f"recbole_mm: pandas {pd.__version__} is installed, but RecBole 1.2.1 breaks on "
            "pandas >= 3 (token_seq fields crash in Dataset._remap, NaN filling silently "
            "stops). Fix: pip install 'pandas>=2.2,<3'"
        )


def _numpy_aliases():
    # recbole/config/configurator.py:80 compatibility_settings() reads np.float_, np.complex_,
    # np.unicode_, removed in numpy 2.0 (RecBole #2215, PRs #2187/#2203 unmerged). With them
    # defined, compatibility_settings() recreates the remaining legacy names (np.float, np.bool,
    # ...) that recbole/evaluator, recbole/data and recbole/model still use.
    aliases = {
        "float_": np.float64,
        "complex_": np.complex128,
        "unicode_": np.str_,
        # ray/tune/logger/tensorboardx.py reads np.bool8 (RecBole #2215, PR #2078); harmless
        # for recbole_mm, which never imports ray, but keeps a user's own ray import alive.
        "bool8": np.bool_,
    }
    for name, value in aliases.items():
        if not hasattr(np, name):
            setattr(np, name, value)


def _quiet_warnings():
    # recbole/data/dataset/dataset.py:501,648,650,712 and sequential_dataset.py:165 emit
    # pandas FutureWarnings on every load (pandas 2.2/2.3); they are RecBole's, not the user's.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\..*")
    # recbole/trainer/trainer.py:30 uses torch.cuda.amp.GradScaler (deprecated since torch 2.4).
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler.*")
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*")
    # recbole/quick_start/quick_start.py:20 imports ray, whose ray/_private/parameter.py:4
    # imports pkg_resources (deprecated in setuptools >= 67, removed in 81).
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", module=r"ray\..*")


def torch_load(path, map_location=None):
    """Load a RecBole checkpoint on torch >= 2.6.

    recbole/trainer/trainer.py:323 and :583 call ``torch.load`` without ``weights_only``;
    torch >= 2.6 defaults it to True and RecBole checkpoints pickle the whole ``Config``
    (RecBole #2212, #2215; PR #2187 unmerged). Only load checkpoints you trust.
    """
    import torch

    return torch.load(path, map_location=map_location, weights_only=False)


# RecBole modules whose ``torch.load`` calls read RecBole's own checkpoints (which pickle the
# whole ``Config``, so ``weights_only=True`` refuses them):
#   recbole/trainer/trainer.py:323 (Trainer.resume_checkpoint) and :583 (Trainer.evaluate with
#     load_best_model=True), through the module-level ``import torch`` (line 26);
#   recbole/quick_start/quick_start.py:250 (load_data_and_model), through a function-local
#     ``import torch`` (line 248).
# The dataset / dataloader files that load_data_and_model may read next (saved/*-dataset.pth,
# *-for-*-dataloader.pth) go through pickle.load in recbole/data/utils.py:61,122, not torch.load.
_TRUSTED_LOAD_MODULES = ("recbole.trainer.trainer", "recbole.quick_start.quick_start")


class _TrustedTorch(types.ModuleType):
    """``torch`` as seen by the modules in ``_TRUSTED_LOAD_MODULES`` only: every attribute is the
    real torch's, except that ``load`` defaults to ``weights_only=False`` (a caller that passes
    ``weights_only`` gets what it asked for). The real ``torch.load`` is never touched."""

    def __init__(self, torch):
        super().__init__("torch", torch.__doc__)
        self.__dict__["_torch"] = torch

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def __repr__(self):
        return "<module 'torch' (recbole_mm: load defaults to weights_only=False)>"

    def load(self, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return self._torch.load(*args, **kwargs)


_TRUSTED_TORCH = None


def _trusted_torch():
    global _TRUSTED_TORCH
    if _TRUSTED_TORCH is None:
        import torch

        _TRUSTED_TORCH = _TrustedTorch(torch)
    return _TRUSTED_TORCH


def _trust_torch_load(module):
    """Make ``torch.load`` inside ``module`` default to ``weights_only=False``; idempotent.

    A module-level ``torch`` name is replaced by the proxy. A function-local ``import torch``
    (quick_start.py:248) is redirected by giving the module its own ``__builtins__`` whose
    ``__import__`` hands out the proxy in place of torch, and re-creating the module's functions
    that name torch (a function keeps the builtins it was created with)."""
    proxy = _trusted_torch()
    namespace = vars(module)
    if namespace.get("_recbole_mm_trusted_load"):
        return
    if namespace.get("torch") is proxy._torch:
        namespace["torch"] = proxy
    local_importers = [
        name for name, value in namespace.items()
        if isinstance(value, types.FunctionType) and value.__globals__ is namespace
        and "torch" in value.__code__.co_names
    ]
    if local_importers:
        real_import = builtins.__import__

        def _import(name, globals=None, locals=None, fromlist=(), level=0):
            found = real_import(name, globals, locals, fromlist, level)
            return proxy if found is proxy._torch else found

        own_builtins = dict(vars(builtins))
        own_builtins["__import__"] = _import
        namespace["__builtins__"] = own_builtins
        package = sys.modules.get(module.__name__.rpartition(".")[0])
        for name in local_importers:
            old = namespace[name]
            new = types.FunctionType(old.__code__, namespace, old.__name__, old.__defaults__,
                                     old.__closure__)
            new.__kwdefaults__, new.__qualname__ = old.__kwdefaults__, old.__qualname__
            new.__doc__, new.__annotations__ = old.__doc__, old.__annotations__
            new.__dict__.update(old.__dict__)
            namespace[name] = new
            if package is not None and getattr(package, name, None) is old:
                setattr(package, name, new)  # e.g. recbole.quick_start.load_data_and_model
    namespace["_recbole_mm_trusted_load"] = True


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then :func:`_trust_torch_load` on the new module (before the
    importing package binds its names)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _trust_torch_load(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect / linecache
        return getattr(self._loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the modules in ``_TRUSTED_LOAD_MODULES`` when (and only if) they are imported,
    so ``import recbole_mm`` imports neither RecBole's trainer nor quick_start (and so not ray)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TRUSTED_LOAD_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def _trust_recbole_checkpoints():
    # torch >= 2.6 defaults torch.load to weights_only=True; RecBole's own loaders (see
    # _TRUSTED_LOAD_MODULES) then refuse every RecBole checkpoint (RecBole #2212, #2215; PR
    # #2187 unmerged). Scoped to those two modules: torch.load elsewhere keeps its default.
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    for name in _TRUSTED_LOAD_MODULES:
        if name in sys.modules:
            _trust_torch_load(sys.modules[name])


def apply():
    """Apply every workaround; idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    _check_pandas()
    _numpy_aliases()
    _quiet_warnings()
    _trust_recbole_checkpoints()
    _APPLIED = True
