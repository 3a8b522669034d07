"""SICSRec's dataset: a multimodal sequential dataset that builds the stage-1 features it is asked for.

``SICSRecDataset`` is SICSRec's ``dataset`` in its ``MODEL_SPECS`` entry: when SICSRec asks for a
stage-1 (aligned) feature table that is missing or stale, it runs stage 1
(:func:`recbole_mm.model.sicsrec.alignment.run_stage1`) under one build lock; every other feature
is loaded as by :class:`~recbole_mm.data.dataset.MultiModalSequentialDataset`.
"""

from __future__ import annotations

import numpy as np
import torch

from recbole_mm.data.dataset import MultiModalSequentialDataset
from recbole_mm.model.sicsrec.alignment import run_stage1
from recbole_mm.model.sicsrec.settings import setting, stage1_feature_names


class SICSRecDataset(MultiModalSequentialDataset):
    """Multimodal sequential dataset that builds SICSRec's stage-1 features when they are missing.

    Every other feature is loaded as in :class:`MultiModalSequentialDataset`.
    """

    def _load_feature(self, name):
        if not setting(self.config, "stage1") or name not in stage1_feature_names(self.config).values():
            return super()._load_feature(name)
        from recbole_mm.features import align_to_dataset

        if getattr(self, "_stage1_features", None) is None:
            from recbole_mm.features import FeatureStore

            # one lock for all stage-1 tables: they are built together
            with FeatureStore(self.config["data_path"], self.dataset_name).build_lock("sicsrec_stage1"):
                self._stage1_features = run_stage1(self)
        fm = self._stage1_features[name]
        table, missing, stats = align_to_dataset(fm, self.field2id_token[self.iid_field])
        self.mm_features[name] = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
        self.mm_missing[name] = torch.from_numpy(np.asarray(missing, dtype=bool))
        self.mm_stats[name] = stats
        if len(self.mm_features) == len(stage1_feature_names(self.config)):
            self._stage1_features = None  # release the memory maps
