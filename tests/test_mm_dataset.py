"""The multimodal dataset keeps RecBole's catalog and split exactly."""

import numpy as np
import torch
from recbole.data import create_dataset as recbole_create_dataset
from recbole.data import data_preparation

from recbole_mm.config import MMConfig
from recbole_mm.data.dataset import MultiModalSequentialDataset
from recbole_mm.data.features import FeatureStore
from recbole_mm.quick_start import create_dataset

from conftest import FAST, counting_encoder, write_tiny_dataset


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
        every = torch.arange(len(a._dataset))  # the recbole path materialises histories, the lazy one cuts them
        fa = a._dataset[every]
        fb = b._dataset.histories(b._dataset.inter_feat[every], width=a._dataset.max_item_list_len)
        for field in ("user_id", "item_id", "item_id_list", "item_length"):
            assert torch.equal(fa[field], fb[field]), field
    # only the 20 items the dataset uses are encoded (issue 16); none is absent or extra
    stats = mm_ds.mm_stats["text"]
    assert stats["extra_tokens_in_features"] == 0 and stats["absent_from_file"] == 0 and stats["covered"] == 20
    assert mm_ds.mm_features["text"].shape[0] == 21
    manifest = FeatureStore(str(workdir / "data" / "tiny"), "tiny").read_manifest("text")
    assert manifest["n_items"] == 20 and manifest["items_in_file"] == 32
    assert sorted(manifest["tokens"]) == sorted(mm_ds.field2id_token["item_id"][1:].tolist())


def test_features_encode_only_used_items_unless_asked(workdir, monkeypatch, caplog):
    """Items of the .item file that no interaction uses are not encoded (encode_items:
    used, the default); encode_items: all encodes every row; either way they never become
    candidates and the aligned table is the same."""
    import logging

    write_tiny_dataset(workdir / "data", n_users=25, n_items=20, extra_items=5)
    calls = counting_encoder(monkeypatch)
    cfg = dict(FAST, data_path=str(workdir / "data"))
    used_spec = {"text": {"type": "text", "fields": ["title", "genre"]}}
    with caplog.at_level(logging.INFO, logger="recbole_mm"):
        used, *_ = _splits("TSSR", dict(cfg, mm_features=used_spec))
    assert calls == [20]  # the encoder saw only the used items
    assert "encoding 20 of 25 items (5 not used by the dataset; encode_items: all encodes them)" in caplog.text
    store = FeatureStore(str(workdir / "data" / "tiny"), "tiny")
    assert sorted(store.read_manifest("text")["tokens"]) == sorted(used.field2id_token["item_id"][1:].tolist())

    all_spec = {"text": {"type": "text", "fields": ["title", "genre"], "encode_items": "all"}}
    full, *_ = _splits("TSSR", dict(cfg, mm_features=all_spec))
    assert calls == [20, 25]  # the cache lacked the 5 unused items: rebuilt with all of them
    assert store.read_manifest("text")["n_items"] == 25 and full.mm_stats["text"]["extra_tokens_in_features"] == 5
    np.testing.assert_allclose(full.mm_features["text"].numpy(), used.mm_features["text"].numpy(), atol=2e-5)
    again, *_ = _splits("TSSR", dict(cfg, mm_features=used_spec))  # a superset cache serves 'used'
    assert calls == [20, 25]
    assert torch.equal(again.mm_features["text"], full.mm_features["text"])


def test_window_rows():
    uids = np.array([1, 1, 1, 1, 1, 2, 2, 3])
    assert MultiModalSequentialDataset.window_rows(uids, "last", 2).tolist() == [4, 6, 7]
    assert MultiModalSequentialDataset.window_rows(uids, "sliding", 2).tolist() == [0, 2, 4, 6, 7]
