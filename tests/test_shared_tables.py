"""Aligned feature tables shared read-only across processes through a file on disk.

``shared_aligned_table`` writes the table aligned to RecBole's internal item ids once, next to
the feature (``<dataset>.<name>.aligned-<key>.npy``), and memory-maps it; these tests check that
its values are those of the in-memory alignment bit for bit, that the file is reused and re-keyed
when it should be, that a read-only folder falls back to memory, and that the tensors the models
hold are the file's pages, not a private copy.
"""

import logging
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from recbole_mm.data.features import (
    FeatureStore,
    align_to_dataset,
    aligned_table_path,
    load_user_features,
    shared_aligned_table,
)
from recbole_mm.model.layers import ContentProjector

from conftest import build_tiny, instantiate
from test_features import make_read_only  # noqa: F401 - fixture

TOKENS = [f"t{i}" for i in range(12)]


def _matrix(n=12, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.fixture
def store(tmp_path):
    s = FeatureStore(tmp_path / "toy", "toy")
    missing = np.zeros(len(TOKENS), dtype=bool)
    missing[3] = True  # flagged missing: its row is zeroed although the file has values
    s.save("text", TOKENS, _matrix(), missing, {"encoder": "enc", "input_checksum": "x"})
    return s


def _id2token(order=None):
    # PAD, a subset of the feature's tokens in a shuffled order, and one token the file lacks
    tokens = ["t5", "t0", "t3", "t11", "t7", "absent", "t2"] if order is None else order
    return np.array(["[PAD]"] + tokens)


def _as_tensor(table):
    """What MultiModalSequentialDataset does with a table."""
    return torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))


def _mapping_of(address):
    """The file backing the mapping that holds ``address`` in this process ('' = anonymous)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= address < end:
                return parts[5].strip() if len(parts) > 5 else ""
    return None


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")


def test_equals_the_in_memory_alignment_and_is_reused(store, monkeypatch):
    fm = store.load("text")
    ref_table, ref_missing, ref_stats = align_to_dataset(fm, _id2token())
    table, missing, stats, path = shared_aligned_table(fm, _id2token())
    assert path == aligned_table_path(fm, _id2token())
    assert os.path.basename(path).startswith("toy.text.aligned-") and path.endswith(".npy")
    assert os.path.dirname(path) == store.dataset_dir
    assert isinstance(table, np.memmap) and table.dtype == np.float32 and table.flags.c_contiguous
    assert table.shape == ref_table.shape and table.tobytes() == ref_table.tobytes()  # bit for bit
    assert np.array_equal(missing, ref_missing) and stats == ref_stats
    assert not table[0].any() and not table[3].any()  # PAD and the flagged-missing item: zeros
    before = os.stat(path)

    def no_write(*a, **kw):
        raise AssertionError("a fresh aligned table must not be rewritten")

    monkeypatch.setattr("recbole_mm.features.align.save_npy_atomic", no_write)
    again, missing2, stats2, path2 = shared_aligned_table(store.load("text"), _id2token())
    after = os.stat(path2)
    assert path2 == path and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert again.tobytes() == ref_table.tobytes() and np.array_equal(missing2, ref_missing) and stats2 == ref_stats


def test_another_id_order_or_feature_gets_another_file(store):
    fm = store.load("text")
    _, _, _, first = shared_aligned_table(fm, _id2token())
    reordered = _id2token(["t0", "t5", "t3", "t11", "t7", "absent", "t2"])
    table, _, _, second = shared_aligned_table(fm, reordered)
    assert second != first and os.path.isfile(first)
    assert table.tobytes() == align_to_dataset(fm, reordered)[0].tobytes()
    # the same tokens and shape with other values: another matrix checksum, another file
    store.save("text", TOKENS, _matrix(seed=1), None, {"encoder": "enc", "input_checksum": "y"})
    fm2 = store.load("text")
    table2, _, _, third = shared_aligned_table(fm2, _id2token())
    assert third not in (first, second)
    assert table2.tobytes() == align_to_dataset(fm2, _id2token())[0].tobytes()
    # the same matrix with another missing mask (nothing flagged now): another file
    store.save("text", TOKENS, _matrix(seed=1), np.arange(12) == 5, {"encoder": "enc", "input_checksum": "y"})
    _, _, _, fourth = shared_aligned_table(store.load("text"), _id2token())
    assert fourth not in (first, second, third)
    removed = store.delete_aligned("text")
    assert sorted(removed) == sorted({first, second, third, fourth})


def test_user_file_without_checksum_is_keyed_by_size_and_mtime(tmp_path):
    np.save(tmp_path / "mine.npy", _matrix())
    (tmp_path / "mine.txt").write_text("\n".join(TOKENS) + "\n")
    fm = load_user_features(tmp_path / "mine.npy", tmp_path / "mine.txt", name="mine")
    table, _, _, path = shared_aligned_table(fm, _id2token())
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("mine.aligned-")
    assert table.tobytes() == align_to_dataset(fm, _id2token())[0].tobytes()
    os.utime(tmp_path / "mine.npy", ns=(1, 1))  # touched: cannot be the same file any more
    fm = load_user_features(tmp_path / "mine.npy", tmp_path / "mine.txt", name="mine")
    assert aligned_table_path(fm, _id2token()) != path


def test_read_only_folder_falls_back_to_memory(store, make_read_only, caplog):  # noqa: F811
    fm = store.load("text")
    ref = align_to_dataset(fm, _id2token())[0]
    make_read_only(store.dataset_dir)
    with caplog.at_level(logging.INFO, logger="recbole_mm"):
        table, missing, stats, path = shared_aligned_table(fm, _id2token())
    assert path is None and not isinstance(table, np.memmap) and table.tobytes() == ref.tobytes()
    fallback = [r for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(fallback) == 1 and "own copy in memory" in fallback[0].getMessage()
    assert not [p for p in os.listdir(store.dataset_dir) if "aligned" in p or p.startswith(".tmp-")]


def test_read_only_folder_still_shares_a_table_written_before(store, make_read_only):  # noqa: F811
    fm = store.load("text")
    _, _, _, path = shared_aligned_table(fm, _id2token())
    make_read_only(store.dataset_dir)
    table, _, _, again = shared_aligned_table(fm, _id2token())
    assert again == path and isinstance(table, np.memmap)


def test_a_damaged_table_is_rebuilt(store):
    fm = store.load("text")
    _, _, _, path = shared_aligned_table(fm, _id2token())
    np.save(path, np.zeros((2, 2), dtype=np.float32))  # wrong shape under the right name
    table, _, _, again = shared_aligned_table(fm, _id2token())
    assert again == path and table.tobytes() == align_to_dataset(fm, _id2token())[0].tobytes()


@needs_proc_maps
def test_tensors_and_frozen_embeddings_are_the_files_pages(store):
    fm = store.load("text")
    table, _, _, path = shared_aligned_table(fm, _id2token())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable NumPy array" warning from torch
        tensor = _as_tensor(table)
    assert os.path.realpath(_mapping_of(tensor.data_ptr())) == os.path.realpath(path)
    in_memory = _as_tensor(align_to_dataset(fm, _id2token())[0])
    assert _mapping_of(in_memory.data_ptr()) != path
    assert torch.equal(tensor, in_memory)

    # the models' frozen tables wrap the same pages (no copy) and score the same
    torch.manual_seed(0)
    shared = ContentProjector({"text": tensor}, hidden_size=4)
    torch.manual_seed(0)
    private = ContentProjector({"text": in_memory}, hidden_size=4)
    assert shared.tables["text"].weight.data_ptr() == tensor.data_ptr()
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert torch.equal(shared(ids), private(ids))
    state = shared.state_dict()
    assert "tables.text.weight" not in state  # the checksum of the table goes in instead
    private.load_state_dict(state)

    # a write (none of the models does one) stays private to this process: copy-on-write
    with torch.no_grad():
        old = shared.state_dict()
        old["tables.text.weight"] = torch.ones_like(tensor)  # an old-style checkpoint with the table
        old.pop("tables.text.sha256")
        shared.load_state_dict(old)
    assert bool((tensor == 1).all())
    assert np.load(path, mmap_mode="r").tobytes() == in_memory.numpy().tobytes()


def test_dataset_tables_are_shared_and_models_score_the_same(tmp_path):
    """MultiModalSequentialDataset with feature_table_mmap on and off: the same tables bit for bit,
    the shared one file-backed, and TSSR's scores unchanged."""
    from recbole_mm.model.tssr import TSSR

    config_off, dataset_off, (train_off, _, _) = build_tiny(tmp_path, "TSSR", feature_table_mmap=False)
    folder = tmp_path / "data" / "tiny"
    assert not [p for p in os.listdir(folder) if ".aligned-" in p]
    config_on, dataset_on, (train_on, _, _) = build_tiny(tmp_path, "TSSR")
    written = [p for p in os.listdir(folder) if p.startswith("tiny.text.aligned-") and p.endswith(".npy")]
    assert len(written) == 1
    on, off = dataset_on.mm_features["text"], dataset_off.mm_features["text"]
    assert on.dtype == off.dtype == torch.float32 and on.numpy().tobytes() == off.numpy().tobytes()
    assert torch.equal(dataset_on.mm_missing["text"], dataset_off.mm_missing["text"])
    assert dataset_on.mm_stats["text"] == dataset_off.mm_stats["text"]
    if os.path.exists("/proc/self/maps"):
        assert os.path.realpath(_mapping_of(on.data_ptr())) == os.path.realpath(folder / written[0])
    m_on = instantiate(config_on, train_on, TSSR)
    m_off = instantiate(config_off, train_off, TSSR)
    assert m_on.content.tables["text"].weight.data_ptr() == on.data_ptr()  # no copy in the model
    batch = next(iter(train_on))
    with torch.no_grad():
        assert torch.equal(m_on.full_sort_predict(batch), m_off.full_sort_predict(batch))


def test_the_switch_is_a_known_config_key():
    import yaml

    from conftest import REPO

    with open(os.path.join(REPO, "properties", "overall.yaml")) as f:
        assert yaml.safe_load(f)["feature_table_mmap"] is True


def test_nn_embedding_from_pretrained_keeps_the_storage(store):
    table, _, _, _ = shared_aligned_table(store.load("text"), _id2token())
    tensor = _as_tensor(table)
    emb = nn.Embedding.from_pretrained(tensor.float(), freeze=True, padding_idx=0)
    assert emb.weight.data_ptr() == tensor.data_ptr()
