"""Issue 3: the multimodal dataset keeps RecBole's catalog and split exactly."""

import numpy as np
import torch
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation

from recbole_mm.config import MMConfig
from recbole_mm.data.dataset import MultiModalSequentialDataset
from recbole_mm.quick_start import create_dataset

from conftest import FAST, write_tiny_dataset


def _splits(model, cfg):
    config = MMConfig(model=model, dataset="tiny", config_dict=cfg)
    dataset = create_dataset(config) if model != "SASRec" else recbole_create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return dataset, train, valid, test


def test_features_never_change_catalog_or_split(workdir):
    # 12 items exist only in the .item file (with text): they must not become candidates
    write_tiny_dataset(workdir / "data", n_users=25, n_items=20, extra_items=12)
    cfg = dict(FAST, data_path=str(workdir / "data"), train_windows="all_prefixes")
    sas_ds, sas_train, sas_valid, sas_test = _splits("SASRec", cfg)
    mm_ds, mm_train, mm_valid, mm_test = _splits("TSSR", cfg)
    assert isinstance(mm_ds, MultiModalSequentialDataset)
    assert mm_ds.item_num == sas_ds.item_num == 21
    assert list(mm_ds.field2id_token["item_id"]) == list(sas_ds.field2id_token["item_id"])
    for a, b in ((sas_train, mm_train), (sas_valid, mm_valid), (sas_test, mm_test)):
        fa, fb = a._dataset.inter_feat, b._dataset.inter_feat
        for field in ("user_id", "item_id", "item_id_list", "item_length"):
            assert torch.equal(fa[field], fb[field]), field
    # the feature file knows 32 items; 12 of them are ignored, counted, never added
    stats = mm_ds.mm_stats["text"]
    assert stats["extra_tokens_in_features"] == 12
    assert mm_ds.mm_features["text"].shape[0] == 21


def test_window_rows():
    uids = np.array([1, 1, 1, 1, 1, 2, 2, 3])
    assert MultiModalSequentialDataset.window_rows(uids, "last", 2).tolist() == [4, 6, 7]
    assert MultiModalSequentialDataset.window_rows(uids, "sliding", 2).tolist() == [0, 2, 4, 6, 7]
