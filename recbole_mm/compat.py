"""Every workaround recbole_mm needs to run RecBole 1.2.1 on today's numpy / pandas / torch.

Applied once, on ``import recbole_mm`` (before any RecBole ``Config`` is built). Nothing in
RecBole's files is patched on disk. See ``../shared/reference/RECBOLE_NOTES.md`` section 2
for the full breakage table; each item below names the RecBole file and the upstream issue.
"""

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


def torch_load(path, map_location=None):
    """Load a RecBole checkpoint on torch >= 2.6.

    recbole/trainer/trainer.py:323 and :583 call ``torch.load`` without ``weights_only``;
    torch >= 2.6 defaults it to True and RecBole checkpoints pickle the whole ``Config``
    (RecBole #2212, #2215; PR #2187 unmerged). Only load checkpoints you trust.
    """
    import torch

    return torch.load(path, map_location=map_location, weights_only=False)


def apply():
    """Apply every workaround; idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    _check_pandas()
    _numpy_aliases()
    _quiet_warnings()
    _APPLIED = True
