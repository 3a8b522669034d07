"""Lazy sequential samples (recbole_mm.data.lazy): RecBole's samples without its (N, L) tables."""

import numpy as np
import pytest
import torch

from recbole_mm.config import MMConfig
from recbole_mm.data.lazy import (
    SEQ_END_FIELD,
    BucketedTrainDataLoader,
    cut_histories,
    data_preparation,
    length_buckets,
    prefix_samples,
)
from recbole_mm.quick_start import create_dataset
from recbole_mm.registry import TRIM_SAFE_RECBOLE_MODELS, get_spec, plugin_specs

from conftest import FAST, build_tiny, instantiate, write_tiny_dataset

LISTS = ("item_id_list", "timestamp_list")


def _prepared(data_path, mode, **extra):
    """Config, dataset and loaders through the plugin, or (``mode="native"``) through RecBole's own
    ``create_dataset`` and ``data_preparation`` (its loader, splits and augmentation loop)."""
    cfg = dict(FAST, data_path=str(data_path), sequence_samples="recbole" if mode == "native" else mode, **extra)
    config = MMConfig(model="SASRec", dataset="tiny", config_dict=cfg)
    if mode == "native":
        from recbole.data import create_dataset as recbole_create_dataset
        from recbole.data import data_preparation as recbole_data_preparation

        dataset = recbole_create_dataset(config)
        return config, dataset, recbole_data_preparation(config, dataset)
    dataset = create_dataset(config)
    return config, dataset, data_preparation(config, dataset)


def _rows(loader, width):
    """Every sample of ``loader``'s dataset, in dataset order, with list fields of ``width``."""
    ds = loader._dataset
    rows = ds[torch.arange(len(ds))]
    if rows["item_id_list"].shape[1] < width:  # trimmed: pad back for comparison
        for f in LISTS:
            rows[f] = torch.nn.functional.pad(rows[f], (0, width - rows[f].shape[1]))
    return rows


def test_prefix_samples_match_recbole_loop():
    rng = np.random.default_rng(0)
    uids = np.sort(rng.integers(0, 30, size=400))
    for max_len in (1, 3, 50):
        # RecBole's loop (sequential_dataset.py, data_augmentation)
        targets, lengths, last, start = [], [], None, 0
        for i, u in enumerate(uids):
            if u != last:
                last, start = u, i
            else:
                if i - start > max_len:
                    start += 1
                targets.append(i)
                lengths.append(i - start)
        t, n = prefix_samples(uids, max_len)
        assert t.tolist() == targets and n.tolist() == lengths


def test_cut_histories_layout():
    flat = torch.tensor([10, 11, 12, 13, 14, 15])
    out = cut_histories(flat, torch.tensor([3, 5, 1]), torch.tensor([3, 2, 1]), 4)
    assert out.tolist() == [[10, 11, 12, 0], [13, 14, 0, 0], [10, 0, 0, 0]]
    pairs = torch.arange(12.0).reshape(6, 2)  # a field with a trailing dimension
    assert cut_histories(pairs, torch.tensor([2]), torch.tensor([1]), 2).tolist() == [[[2.0, 3.0], [0.0, 0.0]]]


@pytest.mark.parametrize("trim", [False, True])
def test_same_samples_same_order_as_recbole(workdir, trim):
    write_tiny_dataset(workdir / "data", n_users=30, n_items=25, min_len=3, max_len=25)
    _, ref_ds, ref = _prepared(workdir / "data", "native")
    _, lazy_ds, new = _prepared(workdir / "data", "lazy", trim_batches=trim)
    assert "item_id_list" in ref_ds.inter_feat and "item_id_list" not in lazy_ds.inter_feat
    assert lazy_ds.lazy_sequences and not getattr(ref_ds, "lazy_sequences", False)
    L = FAST["MAX_ITEM_LIST_LENGTH"]
    for i, (a, b) in enumerate(zip(ref, new)):
        ra, rb = _rows(a, L), _rows(b, L)
        assert len(ra) == len(rb) > 0
        if i:  # evaluation sets may be reordered (below): compare them user by user
            ra, rb = (r[torch.argsort(r["user_id"])] for r in (ra, rb))
        for f in ("user_id", "item_id", "timestamp", "item_length") + LISTS:
            assert torch.equal(ra[f], rb[f]), f
    # training batches, as the loaders yield them under the same seed: identical rows in identical order
    for a, b in zip(ref[:1], new[:1]):
        for ba, bb in zip(a, b):
            ba, bb = ba[0] if isinstance(ba, tuple) else ba, bb[0] if isinstance(bb, tuple) else bb
            width = bb["item_id_list"].shape[1]
            assert width == (int(bb["item_length"].max()) if trim else L)
            assert torch.equal(ba["user_id"], bb["user_id"]) and torch.equal(ba["item_id"], bb["item_id"])
            assert torch.equal(ba["item_id_list"][:, :width], bb["item_id_list"])
            assert not ba["item_id_list"][:, width:].any()  # trimming drops only padding
    # evaluation (one row per user): trimmed sets ordered by history length (metrics are means over users)
    for b in new[1:]:
        lengths = b._dataset.inter_feat["item_length"]
        assert bool((lengths[1:] >= lengths[:-1]).all()) == trim
        for batch in b:
            inter = batch[0]
            assert inter["item_id_list"].shape[1] == (int(inter["item_length"].max()) if trim else L)
    # the training interaction matrix (targets + each user's first item) is RecBole's
    assert (ref[0]._dataset.inter_matrix(form="csr") != new[0]._dataset.inter_matrix(form="csr")).nnz == 0


def test_no_materialised_table(workdir):
    write_tiny_dataset(workdir / "data", n_users=30, n_items=25)
    _, ds, (train, _, _) = _prepared(workdir / "data", "lazy")
    assert all(t.dim() == 1 for t in train._dataset.inter_feat.interaction.values())
    assert SEQ_END_FIELD in train._dataset.inter_feat


def test_length_buckets_cover_every_sample_once():
    lengths = torch.tensor(np.random.default_rng(1).integers(1, 50, size=1003))
    gen = torch.Generator().manual_seed(3)
    batches = length_buckets(lengths, 32, 4, gen)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1003))
    assert sum(len(b) < 32 for b in batches) <= -(-1003 // (32 * 4))  # only a pool's last batch is short
    # within a batch lengths are close: far less spread than random batches
    def spread(bs):
        return np.mean([int(lengths[b].max() - lengths[b].min()) for b in bs])

    random_batches = torch.randperm(1003, generator=torch.Generator().manual_seed(3)).split(32)
    assert spread(batches) < spread(random_batches) / 3  # a pool of 4 batches: about 1/4 of the range
    again = length_buckets(lengths, 32, 4, torch.Generator().manual_seed(3))
    assert again == batches  # same seed, same epoch


def test_bucketed_loader_and_ddp_shares(workdir):
    write_tiny_dataset(workdir / "data", n_users=40, n_items=25, min_len=3, max_len=25)
    config, _, (train, _, _) = _prepared(workdir / "data", "lazy", length_bucketing=True, bucket_pool_batches=2,
                                         train_batch_size=16)
    assert isinstance(train, BucketedTrainDataLoader)
    seen = []
    widths = []
    for batch in train:
        seen.extend(batch["user_id"].tolist())
        widths.append(batch["item_id_list"].shape[1])
        assert batch["item_id_list"].shape[1] == int(batch["item_length"].max())
    assert len(seen) == len(train._dataset) and len(widths) == len(train)
    from recbole_mm.data.lazy import LengthBucketBatchSampler

    lengths = train._dataset.inter_feat["item_length"]
    shares = [list(LengthBucketBatchSampler(lengths, 8, 2, torch.Generator().manual_seed(5), r, 2)) for r in (0, 1)]
    together = sorted(i for s in shares for b in s for i in b)
    assert together == list(range(len(lengths)))  # two ranks: disjoint, complete


def test_bucketing_needs_lazy_samples(workdir):
    write_tiny_dataset(workdir / "data", n_users=20, n_items=15)
    with pytest.raises(ValueError, match="length_bucketing needs lazy"):
        _prepared(workdir / "data", "recbole", length_bucketing=True)


@pytest.mark.parametrize("model", sorted(TRIM_SAFE_RECBOLE_MODELS)
                         + sorted(n for n, s in plugin_specs().items() if s.trim_safe))
def test_trimmed_scores_equal_padded(workdir, model, monkeypatch):
    """Models trimmed by default (trim_batches: auto; every plugin model whose spec says trim_safe)
    score a trimmed batch as its padded version."""
    from recbole_mm.data import lazy

    extra = get_spec(model).test_config or {}
    config, dataset, (train, _, test) = build_tiny(workdir, model, MAX_ITEM_LIST_LENGTH=20, **extra)
    assert lazy.trimming(config)
    from recbole_mm.registry import get_model

    net = instantiate(config, train, get_model(model))  # eval mode: no dropout
    ds = test._dataset
    every = torch.arange(len(ds))
    trimmed, padded = ds.histories(ds.inter_feat[every]), ds.histories(ds.inter_feat[every], width=20)
    assert trimmed["item_id_list"].shape[1] < 20
    with torch.no_grad():
        assert torch.allclose(net.full_sort_predict(trimmed), net.full_sort_predict(padded), atol=1e-5, rtol=1e-5)
        la, lb = net.calculate_loss(trimmed), net.calculate_loss(padded)
    la = sum(la) if isinstance(la, tuple) else la
    lb = sum(lb) if isinstance(lb, tuple) else lb
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5)


def test_sasrec_ml100k_same_metrics_as_recbole_path(workdir):
    """The embedded ml-100k, SASRec, fixed seed: the lazy path (trimmed batches) reaches RecBole's
    own path's validation and test metrics (same samples, same order, same initialisation)."""
    from recbole_mm.quick_start import run_recbole_mm

    cfg = dict(FAST, data_path=str(workdir / "data"), checkpoint_dir=str(workdir / "saved"), hidden_size=8,
               inner_size=16, MAX_ITEM_LIST_LENGTH=20, train_batch_size=512, eval_batch_size=1024,
               record_runs=False, cpu_threads=1)
    results = {mode: run_recbole_mm(model="SASRec", dataset="ml-100k", config_dict=dict(cfg, sequence_samples=mode),
                                    saved=False)
               for mode in ("recbole", "lazy")}
    ref, new = results["recbole"], results["lazy"]
    assert ref["test_result"]["ndcg@10"] > 0
    for key in ("best_valid_result", "test_result"):
        for metric, value in ref[key].items():
            assert new[key][metric] == pytest.approx(value, abs=2e-4), (key, metric)


def test_bucketed_order_resumes_from_the_generator_state(workdir):
    """Resume restores ``train_data.generator``'s state (recbole_mm/trainer/resume.py); the bucketed loader's next epoch
    then yields the batches the uninterrupted run would have."""
    write_tiny_dataset(workdir / "data", n_users=40, n_items=25, min_len=3, max_len=25)
    extra = dict(length_bucketing=True, bucket_pool_batches=2, train_batch_size=16)
    _, _, (first, _, _) = _prepared(workdir / "data", "lazy", **extra)
    epoch1 = [b["user_id"].tolist() for b in first]
    state = first.generator.get_state()
    epoch2 = [b["user_id"].tolist() for b in first]
    _, _, (fresh, _, _) = _prepared(workdir / "data", "lazy", **extra)
    fresh.generator.set_state(state)
    assert [b["user_id"].tolist() for b in fresh] == epoch2 != epoch1


def test_eval_blocks_fit_the_memory_budget(workdir):
    """eval_memory_mb caps the users per full-ranking block of a sequential model; metrics unchanged."""
    from recbole_mm.quick_start import run_recbole_mm

    write_tiny_dataset(workdir / "data", n_users=40, n_items=30)
    cfg = dict(FAST, data_path=str(workdir / "data"), checkpoint_dir=str(workdir / "saved"), record_runs=False,
               eval_batch_size=4096)
    n_items = 31  # 30 items + padding
    budget = 7 * 2 * 4 * n_items / 2 ** 20  # room for 7 users' scores
    config, dataset, (_, valid, test) = _prepared(workdir / "data", "lazy", eval_batch_size=4096, eval_memory_mb=budget)
    assert config["eval_batch_size"] == 7 and max(len(b[0]) for b in test) == 7
    capped = run_recbole_mm(model="SASRec", dataset="tiny", config_dict=dict(cfg, eval_memory_mb=budget), saved=False)
    whole = run_recbole_mm(model="SASRec", dataset="tiny", config_dict=dict(cfg, eval_memory_mb=None), saved=False)
    for metric, value in whole["test_result"].items():
        assert capped["test_result"][metric] == pytest.approx(value, abs=1e-6), metric


def test_trim_batches_choices(workdir, caplog):
    """auto trims verified models only; True on an unverified model trims with a warning; a typo stops."""
    from recbole_mm.data.lazy import trimming

    write_tiny_dataset(workdir / "data", n_users=20, n_items=15)

    def config(model, value):
        return MMConfig(model=model, dataset="tiny", config_dict=dict(FAST, data_path=str(workdir / "data"),
                                                                     trim_batches=value))

    assert trimming(config("SASRec", "auto")) and not trimming(config("BERT4Rec", "auto"))
    assert not trimming(config("SASRec", False))
    with caplog.at_level("WARNING"):
        assert trimming(config("BERT4Rec", True))
    assert "not verified" in caplog.text
    with pytest.raises(ValueError, match="trim_batches must be auto"):
        trimming(config("SASRec", "yes"))
