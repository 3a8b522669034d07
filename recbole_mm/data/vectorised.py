"""Vectorised replacements for RecBole's per-row Python work in loading and splitting.

Measured on 1M interactions (benchmarks/bench_data_scale.py): RecBole reads atomic files with
pandas' pure-Python CSV parser (``engine="python"``, ~3.6 s), groups rows by user with a dict of
lists (``_grouped_index``, ~0.3 s) and indexes its ``Interaction`` with Python lists (an ndarray
index is turned into a list first: ~1.8 s for the leave-one-out split). :class:`VectorisedDatasetMixin`
gives the same DataFrames, groups, splits and row order with pandas' C parser and numpy/torch
indexing. Every dataset the plugin builds (RecBole's models included) goes through it.

Its ``build`` is also where the training split is thinned for ``sparsity_keep`` < 1
(:mod:`recbole_mm.data.sparsity`): after the split, on the training part only, so validation and
test are those of the full data. Before it, ``cold_items`` / ``cold_items_after`` hold items out
of training (:mod:`recbole_mm.data.cold`): every interaction with a cold item leaves the training
split (targets and histories), validation and test stay as they are.
"""

import numpy as np
import pandas as pd
import torch
from recbole.data.interaction import Interaction


def take(inter, index):
    """Rows ``index`` (integer array or tensor) of an ``Interaction``, indexed by tensors."""
    index = torch.as_tensor(np.asarray(index, dtype=np.int64))
    return Interaction({field: values[index] for field, values in inter.interaction.items()})


def group_order(keys):
    """``(order, counts)``: row indices grouped by key, groups in order of first appearance and rows
    ascending within a group (the groups and order of RecBole's ``Dataset._grouped_index``)."""
    codes, _ = pd.factorize(np.asarray(keys))
    return np.argsort(codes, kind="stable"), np.bincount(codes)


def leave_one_out_index(order, counts, leave_one_num):
    """RecBole's ``_split_index_by_leave_one_out`` on :func:`group_order`'s arrays: per group, the
    last ``min(leave_one_num, size - 1)`` rows go one each to the last parts, the rest to part 0."""
    sizes = np.repeat(counts, counts)
    position = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    legal = np.minimum(leave_one_num, sizes - 1)
    part = np.where(position < sizes - legal, 0, leave_one_num + 1 - (sizes - position))
    return [order[part == k] for k in range(leave_one_num + 1)]


class _CParserPandas:
    """``pandas`` as RecBole's dataset module sees it inside ``_load_feat``: ``read_csv`` with the C
    parser when the separator is one character (what the Python parser is needed for is longer
    or regex separators); everything else is pandas itself."""

    def __getattr__(self, name):
        return getattr(pd, name)

    @staticmethod
    def read_csv(*args, **kwargs):
        if kwargs.get("engine") == "python" and len(str(kwargs.get("delimiter") or "")) == 1:
            kwargs["engine"] = "c"
        return pd.read_csv(*args, **kwargs)


class VectorisedDatasetMixin:
    """For :class:`recbole.data.dataset.Dataset` subclasses (see the module docstring)."""

    cold_items = None  # bool numpy array over internal item ids: the items held out (None: none)
    cold_stats = None

    def _load_feat(self, filepath, source):
        import recbole.data.dataset.dataset as recbole_dataset

        recbole_dataset.pd = _CParserPandas()
        try:
            return super()._load_feat(filepath, source)
        finally:
            recbole_dataset.pd = pd

    def build(self):
        """RecBole's ``build`` (splits), then the cold items' interactions removed from the training
        split (``cold_items``, ``cold_items_after``, ``cold_seed``; nothing at the defaults;
        ``cold_items``: the mask, ``cold_stats``: what was held out), then the training split thinned
        as ``sparsity_keep`` / ``sparsity_mode`` / ``sparsity_seed`` say (nothing at the default
        ``sparsity_keep: 1.0``); ``sparsity_stats``: what was kept (None when nothing was thinned)."""
        from recbole_mm.data.cold import cold_item_mask, hold_out_cold_items
        from recbole_mm.data.sparsity import thin_training

        self.cold_items = cold_item_mask(self)  # from the interactions, before the split; copies inherit it
        datasets = super().build()
        self.cold_stats = hold_out_cold_items(self, datasets, self.cold_items)
        self.sparsity_stats = thin_training(self, datasets[0])
        return datasets

    def _grouped_index(self, group_by_list):
        order, counts = group_order(group_by_list)
        return np.split(order, np.cumsum(counts)[:-1])

    def leave_one_out(self, group_by, leave_one_mode):
        """RecBole's ``Dataset.leave_one_out`` (same parts, same row order), vectorised."""
        modes = {"valid_and_test": 2, "valid_only": 1, "test_only": 1}
        if group_by is None:
            raise ValueError("leave one out strategy require a group field")
        if leave_one_mode not in modes:
            raise NotImplementedError(f"The leave_one_mode [{leave_one_mode}] has not been implemented.")
        order, counts = group_order(self.inter_feat[group_by].numpy())
        parts = leave_one_out_index(order, counts, modes[leave_one_mode])
        empty = np.zeros(0, dtype=np.int64)
        if leave_one_mode == "valid_only":
            parts.append(empty)
        elif leave_one_mode == "test_only":
            parts = [parts[0], empty, parts[1]]
        self._drop_unused_col()
        return [self.copy(take(self.inter_feat, index)) for index in parts]
