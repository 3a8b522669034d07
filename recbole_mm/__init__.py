"""recbole_mm: multimodal sequential recommendation (TSSR, SICSRec) as a RecBole plugin.

Importing the package applies the compatibility layer (``recbole_mm.compat``) first, so
RecBole 1.2.1 runs on numpy 2 and torch >= 2.6. Heavy parts are imported lazily.
"""

from recbole_mm import compat as _compat

_compat.apply()

__version__ = "0.1.0"

__all__ = [
    "MMConfig",
    "get_model",
    "get_trainer",
    "available_models",
    "run_recbole_mm",
    "objective_function",
    "__version__",
]


def __getattr__(name):
    if name == "MMConfig":
        from recbole_mm.config import MMConfig

        return MMConfig
    if name in ("get_model", "get_trainer", "available_models"):
        from recbole_mm import registry

        return getattr(registry, name)
    if name in ("run_recbole_mm", "objective_function"):
        from recbole_mm import quick_start

        return getattr(quick_start, name)
    raise AttributeError(f"module 'recbole_mm' has no attribute {name!r}")
