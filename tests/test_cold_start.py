"""Cold-start items (recbole_mm.data.cold).

Held-out items never reach training (targets, histories, SICSRec's stage-1 mining), validation and
test are those of ``cold_items: 0``, the warm / cold metrics partition the test users, the models
with IDs score cold items from their content (a ridge map fitted on the warm items; the mean warm
row without features) with no gradient to cold rows, and cold items are out of the training softmax."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from recbole_mm import slices as sl  # noqa: E402
from recbole_mm.config import MMConfig  # noqa: E402
from recbole_mm.data.cold import choose_cold_items, drop_cold_samples  # noqa: E402
from recbole_mm.data.lazy import data_preparation  # noqa: E402
from recbole_mm.model import sicsrec_pairs as sp  # noqa: E402
from recbole_mm.model.layers import ColdRows, ContentNeighbours, ContentRidge, ItemIDEmbedding, id_table  # noqa: E402
from recbole_mm.quick_start import create_dataset  # noqa: E402

from conftest import FAST, build_tiny, instantiate, write_tiny_dataset  # noqa: E402

FIELDS = ("user_id", "item_id", "timestamp", "item_length", "item_id_list", "timestamp_list")


@pytest.fixture
def data(workdir):
    write_tiny_dataset(workdir / "data", n_users=40, n_items=30, min_len=3, max_len=30)
    return str(workdir / "data")


def _config(data_path, model="SASRec", **extra):
    return MMConfig(model=model, dataset="tiny", config_dict=dict(FAST, data_path=data_path, **extra))


def _splits(data_path, model="SASRec", **extra):
    config = _config(data_path, model, **extra)
    dataset = create_dataset(config)
    return dataset, data_preparation(config, dataset)


def _rows(ds):
    """Every sample of ``ds`` with full-width histories, as numpy arrays."""
    inter = ds.inter_feat[torch.arange(len(ds.inter_feat))]
    rows = ds.histories(inter, width=ds.max_item_list_len) if getattr(ds, "lazy_sequences", False) else inter
    return {f: rows[f].numpy() for f in FIELDS}


def _equal(a, b):
    return all(np.array_equal(a[f], b[f]) for f in FIELDS)


def _training_sequences(rows):
    """user -> the user's training interactions (first history item + every target), in time order."""
    out = {}
    for i in np.lexsort((rows["timestamp"], rows["user_id"])):
        u = int(rows["user_id"][i])
        if u not in out:
            assert rows["item_length"][i] == 1
            out[u] = [(int(rows["item_id_list"][i][0]), float(rows["timestamp_list"][i][0]))]
        out[u].append((int(rows["item_id"][i]), float(rows["timestamp"][i])))
    return out


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize("mode", ["lazy", "recbole"])
def test_no_cold_item_reaches_training_and_evaluation_is_unchanged(data, mode):
    base, (train0, valid0, test0) = _splits(data, sequence_samples=mode)
    ds, (train, valid, test) = _splits(data, sequence_samples=mode, cold_items=0.2)
    cold = ds.cold_items
    assert cold is not None and cold.sum() == round(0.2 * 30) and not cold[0]
    rows = _rows(train._dataset)
    assert not cold[rows["item_id"]].any()  # no cold target
    assert not cold[rows["item_id_list"]].any()  # no cold item in any training history
    # validation and test: the same samples (targets and histories) as without cold items
    for a, b in ((valid0, valid), (test0, test)):
        assert _equal(_rows(a._dataset), _rows(b._dataset))
    assert cold[_rows(test._dataset)["item_id"]].any()  # some test targets are cold
    assert cold[_rows(test._dataset)["item_id_list"]].any()  # and cold items appear in test histories
    stats = ds.cold_stats
    assert stats["items"] == [int(cold.sum()), 30] and stats["seed"] == 0
    assert stats["cold_targets"]["test"] == [int(cold[_rows(test._dataset)["item_id"]].sum()), 40]
    assert stats["train_samples"] == [len(rows["user_id"]), len(_rows(train0._dataset)["user_id"])]

    # the rule by hand: each user's training interactions without the cold ones, every prefix
    full = _training_sequences(_rows(train0._dataset))
    expected = {}
    for u, seq in full.items():
        warm = [x for x in seq if not cold[x[0]]]
        samples = []
        for k in range(1, len(warm)):
            hist = [x[0] for x in warm[max(0, k - ds.max_item_list_len):k]]
            samples.append((warm[k][0], warm[k][1], hist))
        if samples:
            expected[u] = samples
    got = {}
    for i in np.lexsort((rows["timestamp"], rows["user_id"])):
        n = int(rows["item_length"][i])
        got.setdefault(int(rows["user_id"][i]), []).append(
            (int(rows["item_id"][i]), float(rows["timestamp"][i]), rows["item_id_list"][i][:n].tolist()))
        assert not rows["item_id_list"][i][n:].any()  # right padding
    assert got == expected


def test_lazy_and_materialised_rebuilds_agree(data):
    _, (lazy, _, _) = _splits(data, sequence_samples="lazy", cold_items=0.3, cold_seed=3)
    _, (mat, _, _) = _splits(data, sequence_samples="recbole", cold_items=0.3, cold_seed=3)
    assert _equal(_rows(lazy._dataset), _rows(mat._dataset))


@pytest.mark.parametrize("mode", ["lazy", "recbole"])
def test_no_cold_items_means_the_same_training_samples(data, mode):
    ds, (train, _, _) = _splits(data, sequence_samples=mode)
    assert ds.cold_items is None and ds.cold_stats is None
    _, (train0, _, _) = _splits(data, sequence_samples=mode, cold_items=0.0, cold_items_after=None)
    assert _equal(_rows(train._dataset), _rows(train0._dataset))
    # the rebuild itself is the identity with an empty cold set
    t = train._dataset
    before = _rows(t)
    assert drop_cold_samples(ds, t, np.zeros(ds.item_num, dtype=bool))[:2] == (len(before["user_id"]),) * 2
    assert _equal(before, _rows(t))


def test_cold_items_after_a_time_cut_and_nested_fractions(data):
    ds, _ = _splits(data, cold_items_after=25000.0)
    inter = ds.inter_feat  # samples: targets' timestamps; first items from the histories
    first = np.full(ds.item_num, np.inf)
    rows = _rows(ds)
    np.minimum.at(first, rows["item_id"], rows["timestamp"])
    np.minimum.at(first, rows["item_id_list"][:, 0], rows["timestamp_list"][:, 0])
    assert np.array_equal(ds.cold_items[1:], first[1:] > 25000.0)
    assert len(inter)
    items = np.random.default_rng(0).integers(1, 50, size=500)
    small = choose_cold_items(50, items, None, 0.1, None, 5)
    large = choose_cold_items(50, items, None, 0.4, None, 5)
    assert small.sum() < large.sum() and not (small & ~large).any()


def test_bad_settings_and_unsupported_models_are_errors(data):
    with pytest.raises(ValueError, match="cold_items must be"):
        _splits(data, cold_items=1.0)
    with pytest.raises(ValueError, match="eval_item_sets"):
        _splits(data, eval_item_sets=["all", "frozen"])
    with pytest.raises(ValueError, match="sequential"):
        _splits(data, model="BPR", cold_items=0.2)


def test_cold_items_then_sparsity_and_stage1_reads_only_training_as_built(data):
    """SICSRec's stage-1 pair mining reads each user's training part as training does: no cold item,
    no interaction sparsity_keep dropped (the sequences before build() equal the built training data)."""
    for extra in ({"cold_items": 0.2}, {"cold_items": 0.2, "sparsity_keep": 0.5},
                  {"sparsity_keep": 0.5, "sparsity_mode": "users"}):
        config = _config(data, **extra)
        ds = create_dataset(config)
        seqs = sp.user_sequences(ds)  # before build(), as stage 1 runs
        train, valid, test = data_preparation(config, ds)
        rows = _rows(train._dataset)
        built = {u: [x[0] for x in s] for u, s in _training_sequences(rows).items()}
        token2id = ds.field2token_id[ds.uid_field]
        cold = ds.cold_items if ds.cold_items is not None else np.zeros(ds.item_num, dtype=bool)
        for s in seqs:
            part = s.items[:s.n_train]
            assert not cold[part].any()
            u = int(token2id[s.user])
            if len(s.items) < 4:  # 3 interactions: RecBole trains on 2 (no validation target), stage 1 reads 1
                continue
            if len(part) >= 2:
                assert part == built[u], (extra, s.user)
            else:
                assert u not in built
            q = sp.pair_query(s)
            if q is not None:
                assert not cold[[q[0]] + q[1]].any()
        # validation and test targets follow, unchanged
        v = dict(zip(valid._dataset.inter_feat["user_id"].tolist(), valid._dataset.inter_feat["item_id"].tolist()))
        assert all(s.items[s.n_train] == v[int(token2id[s.user])] for s in seqs if int(token2id[s.user]) in v)


def test_full_last_pairs_with_cold_items_are_refused(data):
    ds = create_dataset(_config(data, cold_items=0.2, pair_target="full_last"))
    with pytest.raises(ValueError, match="full_last"):
        sp.user_sequences(ds)


# ----------------------------------------------------------------------------- slices and the record


def test_warm_and_cold_metrics_partition_the_test_users(workdir):
    from recbole_mm.quick_start import run_recbole_mm

    write_tiny_dataset(workdir / "data")
    record = workdir / "run.json"
    cfg = dict(FAST, data_path=str(workdir / "data"), checkpoint_dir=str(workdir / "saved"),
               record_path=str(record), metrics=["Hit", "NDCG", "MRR"], topk=[5, 10],
               cold_items=0.2, eval_item_sets=["all", "warm", "cold"])
    result = run_recbole_mm(model="SASRec", dataset="tiny", config_dict=cfg)
    rec = json.loads(record.read_text())
    family = rec["test_slices"]["item_set"]
    assert list(family["buckets"]) == ["warm", "cold"]
    assert rec["cold_items"]["items"][0] == 6
    n_cold = rec["cold_items"]["cold_targets"]["test"][0]
    assert family["buckets"]["cold"]["n"] == n_cold > 0
    assert family["buckets"]["warm"]["n"] + n_cold == 40
    for key, value in result["test_result"].items():
        assert sl.weighted_mean(family["buckets"], key) == pytest.approx(value, abs=6e-5)
    assert rec["test_item_sets"] == {"warm": family["buckets"]["warm"], "cold": family["buckets"]["cold"]}


def test_runs_without_cold_items_have_no_item_set_slice(workdir):
    config, dataset, (train, valid, test) = build_tiny(workdir, "SASRec")
    k = max(config["topk"])
    ranks = np.zeros((len(test._dataset.inter_feat), k + 1), dtype=np.int64)
    ranks[:, k] = 1
    slices = sl.compute_test_slices(torch.as_tensor(ranks), config, dataset, valid, test)
    assert "item_set" not in slices and "target_popularity" in slices


# ----------------------------------------------------------------------------- the models' rule


def test_cold_rows_rule():
    weight = torch.randn(6, 3, requires_grad=True)
    cold = torch.tensor([False, True, False, False, True, False])
    emb = ItemIDEmbedding(torch.nn.Embedding(6, 3, padding_idx=0, _weight=weight.detach().clone()), ColdRows(cold))
    table = id_table(emb)
    mean = emb.weight.detach()[[2, 3, 5]].mean(0)
    assert torch.allclose(table[1], mean) and torch.allclose(table[4], mean)
    assert torch.equal(table[2], emb.weight[2])
    ids = torch.tensor([[1, 2], [4, 0]])
    assert torch.allclose(emb(ids), table[ids])
    (emb(ids).sum() + table.pow(2).sum()).backward()
    assert not emb.weight.grad[[1, 4]].any() and emb.weight.grad[2].abs().sum() > 0
    assert set(emb.state_dict()) == {"weight"}  # checkpoints unchanged


def _model_with_cold(root, model_name, **overrides):
    from recbole_mm.registry import get_model

    config, dataset, (train, _, test) = build_tiny(root, model_name, cold_items=0.3, hidden_dropout_prob=0.0,
                                                  attn_dropout_prob=0.0, **overrides)
    return config, dataset, train, test, get_model(model_name)


def _ridge_by_hand(x, t, warm, cold, lam):
    """Closed-form centred ridge (numpy, float64): the cold rows of ``t`` predicted from ``x``."""
    xw, tw = x[warm], t[warm]
    mx, mt = xw.mean(0), tw.mean(0)
    w = np.linalg.solve((xw - mx).T @ (xw - mx) + lam * np.eye(x.shape[1]), (xw - mx).T @ (tw - mt))
    return mt + (x[cold] - mx) @ w


def test_content_ridge_equals_the_closed_form_and_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    n, dim = 200, 6
    x = torch.randn(n, dim, generator=gen)
    cold = torch.zeros(n, dtype=torch.bool)
    cold[1::7] = True
    warm = ~cold
    warm[0] = False
    b = torch.randn(dim, 3, generator=gen)
    table = 0.5 + x @ b + 0.01 * torch.randn(n, 3, generator=gen)
    ridge = ContentRidge([x[:, :4], x[:, 4:]], warm, cold)  # features in two blocks, as two modalities
    rows = ridge.predict(table)
    lam = ridge.last["lambda"]
    expect = _ridge_by_hand(x.double().numpy(), table.double().numpy(), warm.numpy(), cold.numpy(), lam)
    assert np.allclose(rows.numpy(), expect, atol=1e-8)
    # GCV keeps the penalty small for an (almost) exact linear map: the cold rows are recovered
    assert ridge.last["r2"] > 0.99
    assert torch.allclose(rows.float(), (0.5 + x @ b)[cold], atol=0.05)
    # a table unrelated to the content: the penalty grows and the rows shrink to the warm mean
    noise = torch.randn(n, 3, generator=gen)
    rows = ridge.predict(noise)
    assert ridge.last["lambda"] > lam
    assert (rows - noise[warm].double().mean(0)).abs().max() < (noise[cold].double() - noise[warm].double().mean(0)).abs().max()


def test_cold_rows_content_rule_in_evaluation_mean_rule_in_training_and_its_cache():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=gen)
    cold = torch.zeros(30, dtype=torch.bool)
    cold[[3, 9, 17]] = True
    emb = ItemIDEmbedding(torch.nn.Embedding(30, 2, padding_idx=0, _weight=(x @ torch.randn(4, 2, generator=gen))),
                          ColdRows(cold, [x]))
    assert emb.cold_rule.rule == "content_ridge"
    warm_mean = emb.weight.detach()[1:][~cold[1:]].mean(0)
    emb.train()
    assert torch.allclose(id_table(emb)[cold], warm_mean.expand(3, -1))
    emb.eval()
    table = id_table(emb)
    assert not torch.allclose(table[3], table[9])  # each cold item from its own content
    assert torch.allclose(table[cold], emb.cold_rule.content_map.predict(emb.weight).float(), atol=1e-6)
    assert torch.equal(table[~cold], emb.weight[~cold])
    ids = torch.tensor([[3, 2], [9, 0]])
    assert torch.allclose(emb(ids), table[ids])
    warm_only = torch.tensor([1, 2, 4])
    assert torch.equal(emb(warm_only), emb.weight[warm_only])
    # cached until the table changes, then refitted (also after a write that bypasses autograd's
    # version counter, as a fused optimizer's or a .data write)
    with torch.no_grad():
        emb.weight[5] += 1.0
    refitted = id_table(emb)[cold]
    assert not torch.allclose(refitted, table[cold])
    emb.weight.data[6] += 1.0
    assert not torch.allclose(id_table(emb)[cold], refitted)


def test_content_knn_rows_are_the_nearest_warm_items_rows():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=gen)
    cold = torch.zeros(40, dtype=torch.bool)
    cold[[4, 11, 30]] = True
    warm = ~cold
    warm[0] = False
    table = torch.randn(40, 3, generator=gen)
    knn = ContentNeighbours([x[:, :2], x[:, 2:]], warm, cold, k=3)
    # by hand: blocks centred on the warm mean and scaled to unit mean norm, cosine, top 3 warm items
    blocks = []
    for b in (x[:, :2], x[:, 2:]):
        c = b.double() - b[warm].double().mean(0)
        blocks.append(c / c[warm].norm(dim=1).mean())
    z = torch.nn.functional.normalize(torch.cat(blocks, 1), dim=1)
    warm_ids = torch.nonzero(warm).flatten()
    for row, item in enumerate([4, 11, 30]):
        best = warm_ids[(z[warm_ids] @ z[item]).topk(3).indices]
        assert set(knn.neighbours[row].tolist()) == set(best.tolist())
        assert torch.allclose(knn.predict(table)[row], table[best].double().mean(0))
    one = ColdRows(cold, [x], rule="content_knn", neighbours=1).eval()
    assert one.rule == "content_knn"
    rows = one(table)[cold]
    assert all(any(torch.equal(r, table[w]) for w in warm_ids) for r in rows)  # a warm item's own row
    from types import SimpleNamespace

    from recbole_mm.model.layers import cold_item_rule

    assert cold_item_rule(SimpleNamespace(config={"cold_item_rule": "content_knn", "cold_item_neighbours": 5})) == \
        ("content_knn", 5)
    with pytest.raises(ValueError, match="cold_item_rule must be one of"):
        cold_item_rule(SimpleNamespace(config={"cold_item_rule": "ridge"}))
    with pytest.raises(ValueError, match="cold_item_neighbours"):
        cold_item_rule(SimpleNamespace(config={"cold_item_rule": "content_knn", "cold_item_neighbours": 0}))


@pytest.mark.parametrize("model_name,tables", [
    ("IDContentSASRec", ["item_embedding.weight"]),
    ("TSSR", ["item_embedding.weight", "classifier.weight", "classifier.bias"]),
])
def test_cold_item_rows_get_no_gradient_and_are_scored_by_the_rule(workdir, model_name, tables):
    config, dataset, train, test, cls = _model_with_cold(workdir, model_name)
    cold = torch.from_numpy(dataset.cold_items)
    model = instantiate(config, train, cls)
    model.train()
    loss = model.calculate_loss(next(iter(train)))
    loss = sum(loss) if isinstance(loss, tuple) else loss
    loss.backward()
    params = dict(model.named_parameters())
    for name in tables:
        grad = params[name].grad
        assert grad is not None and not grad[cold].any(), name
        assert grad[~cold].abs().sum() > 0, name
    # scores do not depend on the cold items' own (untrained) rows
    model.eval()
    batch = next(iter(test))[0]
    with torch.no_grad():
        before = model.full_sort_predict(batch)
        for name in tables:
            params[name][cold] = torch.randn_like(params[name][cold]) * 10
        after = model.full_sort_predict(batch)
    assert torch.allclose(before, after, atol=1e-5)
    # content_ridge: every cold item gets its own rows from its content (TSSR's linear classifier too)
    assert not torch.allclose(before[:, cold], before[:, cold][:, :1].expand(-1, int(cold.sum())))
    # content_knn: the rows of the nearest warm item, also read from content (no tie)
    config, dataset, train, test, cls = _model_with_cold(workdir, model_name, cold_item_rule="content_knn")
    model = instantiate(config, train, cls).eval()
    assert model.item_embedding.cold_rule.rule == "content_knn"
    if model_name == "TSSR":
        # cold_item_rule: mean: TSSR's linear classifier has no content on the item side, so its cold
        # items then share one score (the mean warm row and bias)
        config, dataset, train, test, cls = _model_with_cold(workdir, model_name, cold_item_rule="mean")
        model = instantiate(config, train, cls).eval()
        with torch.no_grad():
            scores = model.full_sort_predict(next(iter(test))[0])
        assert torch.allclose(scores[:, cold], scores[:, cold][:, :1].expand(-1, int(cold.sum())))


@pytest.mark.parametrize("model_name", ["ContentSASRec", "TSSR"])
@pytest.mark.parametrize("softmax", ["full", "uniform"])
def test_cold_items_are_out_of_the_training_softmax(workdir, model_name, softmax):
    extra = {} if softmax == "full" else dict(softmax="sampled", sampled_negatives="uniform", n_sampled_negatives=64)
    config, dataset, train, _, cls = _model_with_cold(workdir, model_name, **extra)
    cold = torch.from_numpy(dataset.cold_items)
    model = instantiate(config, train, cls)
    model.train()
    soft = model.softmax
    if softmax == "uniform":
        assert soft.probs[cold].sum() == 0 and torch.allclose(soft.probs[~cold][1:], soft.probs[~cold][1:][0])
        return
    hidden = torch.randn(5, 8)
    weight = torch.randn(dataset.item_num, 8, requires_grad=True)
    labels = torch.nonzero(~cold)[1:6, 0]
    loss = soft(hidden, labels, lambda ids: weight[ids], all_items=lambda: weight)
    logits = hidden @ weight.t()
    expect = torch.nn.functional.cross_entropy(logits[:, ~cold], torch.searchsorted(torch.nonzero(~cold)[:, 0], labels))
    assert torch.allclose(loss, expect, atol=1e-6)
    loss.backward()
    assert not weight.grad[cold].any()
    soft.eval()  # evaluation ranks every item
    assert torch.allclose(soft(hidden, labels, lambda ids: weight[ids], all_items=lambda: weight),
                          torch.nn.functional.cross_entropy(logits, labels), atol=1e-6)


def test_sicsrec_scores_cold_items_from_their_content(workdir):
    from recbole_mm.model.sicsrec import SICSRec

    config, dataset, train, test, _ = _model_with_cold(workdir, "SICSRec", stage1=False)
    model = instantiate(config, train, SICSRec).eval()
    cold = torch.from_numpy(dataset.cold_items)
    table = id_table(model.item_embedding)
    rule = model.item_embedding.cold_rule
    assert rule.rule == "content_ridge"
    assert torch.allclose(table[cold], rule.content_map.predict(model.item_embedding.weight).float(), atol=1e-6)
    assert not torch.allclose(table[cold], table[cold][:1].expand(int(cold.sum()), -1))
    assert torch.allclose(model.item_matrix()[cold], torch.nn.functional.normalize(table[cold], dim=-1), atol=1e-6)
    model.train()  # training: the mean warm row (cold items are not ranked in training)
    mean = model.item_embedding.weight.detach()[1:][~cold[1:]].mean(0)
    assert torch.allclose(id_table(model.item_embedding)[cold], mean.expand(int(cold.sum()), -1))
