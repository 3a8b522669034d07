"""``MultiModalSequentialDataset``: RecBole's ``SequentialDataset`` plus aligned item content.

Item content never goes through RecBole's atomic loader, so the candidate item set is exactly
the one a plain SASRec run gets. After RecBole has filtered and remapped ids, each feature
matrix (keyed by raw item token, see :mod:`recbole_mm.features.store`) is aligned to the
internal ids: row 0 (PAD) and items without content are zero rows with a missing mask.
"""

import os

import numpy as np
import pandas as pd
import torch
from recbole.data.dataset import SequentialDataset
from recbole.utils import set_color

from recbole_mm.data.checks import InteractionChecksMixin
from recbole_mm.data.lazy import LazySequencesMixin
from recbole_mm.data.vectorised import VectorisedDatasetMixin, take

TRAIN_WINDOWS = ("all_prefixes", "last", "sliding")


class MultiModalSequentialDataset(InteractionChecksMixin, LazySequencesMixin, VectorisedDatasetMixin,
                                  SequentialDataset):
    """Sequential dataset exposing ``mm_features`` / ``mm_missing`` aligned to internal item ids.

    - ``mm_features[name]``: float32 tensor (n_items, dim), row 0 = PAD = zeros. Plain tensors,
      not buffers; models wrap them as frozen embeddings. With ``feature_table_mmap`` (default)
      a tensor's storage is a copy-on-write memory map of ``<dataset>.<name>.aligned-<key>.npy``,
      shared by the processes (DDP ranks, runs) that use the same feature and item ids.
    - ``mm_missing[name]``: bool tensor (n_items,), True for PAD and items without content.
    - ``train_windows`` (config): which augmented training samples to keep:
      ``all_prefixes`` (RecBole: every prefix -> next item), ``last`` (one sample per user:
      the prefix whose target is the last training item) or ``sliding`` (samples whose
      targets are ``MAX_ITEM_LIST_LENGTH`` apart, ending at the last training item: with a
      loss at every position each training item is a label exactly once). With
      ``sparsity_keep`` < 1 the training samples are thinned first (``super().build()``,
      :mod:`recbole_mm.data.sparsity`) and the windows are taken from those left: ``last`` is
      still each user's last training sample, its history cut at the first kept interaction.
    """

    def __init__(self, config):
        super().__init__(config)
        self.mm_features = {}
        self.mm_missing = {}
        self.mm_stats = {}
        self._text_inputs = {}
        for name in self.required_feature_names(config):
            self._load_feature(name)

    @staticmethod
    def required_feature_names(config):
        """The features the configured model reads (its :class:`~recbole_mm.registry.ModelSpec`'s
        ``features``), else the config's ``mm_feature_names``."""
        from recbole_mm.registry import required_features

        return required_features(config)

    def feature_spec(self, name):
        specs = self.config["mm_features"] or {}
        if name not in specs:
            raise KeyError(
                f"No feature spec named '{name}' for dataset '{self.dataset_name}'. Add it under "
                f"'mm_features:' in a config file, e.g. mm_features: {{{name}: {{type: text, "
                f"fields: [title], template: '{{title}}'}}}}. Known specs: {sorted(specs)}"
            )
        return dict(specs[name])

    def _load_feature(self, name):
        from recbole_mm.features import extract_features, items_to_encode

        spec = self.feature_spec(name)
        id2token = self.field2id_token[self.iid_field]
        fm = extract_features(  # holds the feature's build lock (parallel cells build it once)
            self.config["data_path"], self.dataset_name, name, spec,
            show_progress=self.config["show_progress"],
            items=items_to_encode(spec, id2token),  # the items kept after filtering (encode_items: used)
        )
        self._set_aligned_feature(name, fm, id2token, expected_dim=spec.get("dim"))

    def _set_aligned_feature(self, name, fm, id2token, expected_dim=None):
        """Align ``fm`` to the internal item ids into ``mm_features`` / ``mm_missing`` / ``mm_stats``.

        With ``feature_table_mmap`` (default True) the table is a memory map of the aligned file
        shared by every process using the same feature and ids
        (:func:`~recbole_mm.features.align.shared_aligned_table`; in memory where the file cannot
        be written); False: a private in-memory table. The values are the same either way."""
        from recbole_mm.features import align_to_dataset, shared_aligned_table

        use_mmap = self.config["feature_table_mmap"]
        if use_mmap is None or bool(use_mmap):
            table, missing, stats, _ = shared_aligned_table(fm, id2token, expected_dim=expected_dim)
        else:
            table, missing, stats = align_to_dataset(fm, id2token, expected_dim=expected_dim)
        # a float32 C-contiguous table (the memory map included) is wrapped, never copied
        self.mm_features[name] = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
        self.mm_missing[name] = torch.from_numpy(np.asarray(missing, dtype=bool))
        self.mm_stats[name] = stats

    # ---------------------------------------------------------------- raw inputs (finetune)
    def text_inputs(self, name, tokenizer, max_length):
        """(input_ids, attention_mask) long tensors (n_items, max_length) aligned to internal ids.

        Tokenised once per dataset object and cached; PAD and items without text get an
        all-padding row with attention on the first token only (so encoders stay finite).
        """
        key = (name, getattr(tokenizer, "name_or_path", id(tokenizer)), max_length)
        if key in self._text_inputs:
            return self._text_inputs[key]
        from recbole_mm.features import read_item_texts

        spec = self.feature_spec(name)
        item_file = os.path.join(self.config["data_path"], f"{self.dataset_name}.item")
        tokens, texts = read_item_texts(item_file, spec.get("fields"), spec.get("template"), spec.get("id_field"),
                                        missing_values=spec.get("missing_values"))
        id2token = self.field2id_token[self.iid_field]
        rows = pd.Index([str(t) for t in tokens]).get_indexer([str(t) for t in id2token])
        aligned = [texts[r] if (r >= 0 and i > 0) else "" for i, r in enumerate(rows)]
        enc = tokenizer(
            aligned, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        mask[:, 0] = 1
        self._text_inputs[key] = (ids, mask)
        return ids, mask

    def image_paths(self, name):
        """Per internal item id, the image file of image feature ``name`` (None: PAD, or no file),
        resolved as its extraction resolves it (``image_field`` / ``image_dir``)."""
        from recbole_mm.features import image_inputs

        spec = self.feature_spec(name)
        data_dir = self.config["data_path"]
        item_file = os.path.join(data_dir, f"{self.dataset_name}.item")
        tokens, paths, _ = image_inputs(data_dir, self.dataset_name, spec, item_file)
        by_token = {str(t): p for t, p in zip(tokens, paths)}
        aligned = [by_token.get(str(t)) for t in self.field2id_token[self.iid_field]]
        aligned[0] = None
        return [p if p is not None and os.path.isfile(p) else None for p in aligned]

    # ---------------------------------------------------------------- training windows
    def build(self):
        datasets = super().build()
        mode = self.config["train_windows"] or "all_prefixes"
        if mode not in TRAIN_WINDOWS:
            raise ValueError(f"train_windows must be one of {TRAIN_WINDOWS}, got {mode!r}")
        if mode != "all_prefixes":
            train = datasets[0]
            keep = self.window_rows(
                train.inter_feat[self.uid_field].numpy(), mode, self.config["MAX_ITEM_LIST_LENGTH"]
            )
            before = len(train.inter_feat)
            train.inter_feat = take(train.inter_feat, keep)
            self.logger.info(
                set_color("train_windows", "blue")
                + f": {mode}, kept {len(train.inter_feat)} of {before} augmented training samples"
            )
        return datasets

    @staticmethod
    def window_rows(uids, mode, window):
        """Indices of the augmented rows to keep; rows of one user are in time order."""
        from_end = pd.Series(uids).groupby(uids).cumcount(ascending=False).to_numpy()
        if mode == "last":
            keep = from_end == 0
        else:
            keep = from_end % int(window) == 0
        return np.flatnonzero(keep)
