"""softmax: sampled (recbole_mm.model.softmax): hand-computed losses, accidental hits, log-Q,
gradients only where candidates are, chunking, and every model that offers it."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from recbole_mm.model.softmax import CatalogueSoftmax, item_frequencies

from conftest import build_tiny, instantiate


class _Data:
    """A stand-in training dataset: its samples' targets are ``targets``."""

    iid_field = "item_id"

    def __init__(self, targets):
        self.inter_feat = {"item_id": torch.tensor(targets)}


def _softmax(n_items=12, targets=(1, 1, 1, 2, 3, 3, 5, 7, 7, 7, 7, 11), **keys):
    config = dict(softmax="sampled", sampled_negatives="in_batch", n_sampled_negatives=6,
                  logq_correction=True, ce_memory_mb=None)
    config.update(keys)
    module = CatalogueSoftmax(config, _Data(list(targets)), n_items, "Test")
    module.train()
    return module


def _params(n_items=12, d=5, rows=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, d, generator=g, requires_grad=True)
    weight = torch.randn(n_items, d, generator=g, requires_grad=True)
    bias = torch.randn(n_items, generator=g, requires_grad=True)
    labels = torch.tensor([1, 3, 3, 7, 2, 11, 7, 1, 5])[:rows]
    return hidden, weight, bias, labels


def test_item_frequencies_smoothed_and_pad_zero():
    counts = item_frequencies(_Data([1, 1, 3]), 5)
    assert counts.tolist() == [0.0, 3.0, 1.0, 2.0, 1.0]


@pytest.mark.parametrize("logq", [True, False])
def test_in_batch_equals_hand_computation(logq):
    hidden, weight, bias, labels = _params()
    sm = _softmax(logq_correction=logq)
    loss = sm(hidden, labels, lambda ids: weight[ids], lambda ids: bias[ids])
    counts = torch.tensor([0, 3, 1, 2, 0, 1, 0, 4, 0, 0, 0, 1], dtype=torch.float64) + 1
    counts[0] = 0
    log_q = (counts / counts.sum()).clamp_min(1e-30).log().float()
    cands = sorted(set(labels.tolist()))  # 1, 2, 3, 5, 7, 11
    expected = 0.0
    for r in range(len(labels)):
        logits = torch.stack([hidden[r] @ weight[c] + bias[c] - (log_q[c] if logq else 0) for c in cands])
        expected = expected - torch.log_softmax(logits, 0)[cands.index(int(labels[r]))]
    assert torch.allclose(loss, expected / len(labels), atol=1e-5)
    # gradients reach only the candidates' rows of the item table
    (grad,) = torch.autograd.grad(loss, [weight])
    touched = grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == cands


@pytest.mark.parametrize("negatives", ["uniform", "popularity"])
def test_drawn_negatives_equal_hand_computation_with_accidental_hits_masked(negatives):
    hidden, weight, bias, labels = _params()
    sm = _softmax(sampled_negatives=negatives, n_sampled_negatives=6)
    torch.manual_seed(3)
    loss = sm(hidden, labels, lambda ids: weight[ids], lambda ids: bias[ids])
    torch.manual_seed(3)
    drawn = torch.multinomial(sm.probs, 6, replacement=True)
    assert drawn.min() > 0  # PAD is never drawn
    q = sm.probs
    if negatives == "uniform":
        assert torch.allclose(q[1:], torch.full((11,), 1 / 11))
    hits = 0
    expected = 0.0
    for r in range(len(labels)):
        y = int(labels[r])
        pos = hidden[r] @ weight[y] + bias[y] - math.log(6 * float(q[y]))
        negs = [hidden[r] @ weight[j] + bias[j] - math.log(6 * float(q[j])) for j in drawn.tolist() if j != y]
        hits += sum(j == y for j in drawn.tolist())
        expected = expected - torch.log_softmax(torch.stack([pos] + negs), 0)[0]
    assert torch.allclose(loss, expected / len(labels), atol=1e-5)
    assert torch.isfinite(loss)


def test_log_q_correction_makes_popularity_sampling_approach_the_full_softmax():
    """With many popularity-drawn negatives, the corrected sampled softmax's gradient points
    where the full softmax's does; without the correction it is biased towards popular items."""
    n_items, d = 40, 6
    g = torch.Generator().manual_seed(0)
    targets = torch.multinomial(torch.arange(1, n_items).double() ** -1.2, 4000, replacement=True,
                                generator=g) + 1
    hidden = torch.randn(16, d, generator=g, requires_grad=True)
    weight = torch.randn(n_items, d, generator=g, requires_grad=True)
    labels = targets[:16]
    full = _softmax(n_items=n_items, targets=targets.tolist(), softmax="full")
    (g_full,) = torch.autograd.grad(full(hidden, labels, lambda ids: weight[ids]), [hidden])
    cos, err = {}, {}
    for logq in (True, False):
        sm = _softmax(n_items=n_items, targets=targets.tolist(), sampled_negatives="popularity",
                      n_sampled_negatives=20000, logq_correction=logq)
        torch.manual_seed(1)
        (g_s,) = torch.autograd.grad(sm(hidden, labels, lambda ids: weight[ids]), [hidden])
        cos[logq] = float(F.cosine_similarity(g_s.flatten(), g_full.flatten(), dim=0))
        err[logq] = float((g_s - g_full).norm() / g_full.norm())
    assert cos[True] > 0.99 and err[True] < 0.05
    assert err[False] > 5 * err[True], err


@pytest.mark.parametrize("negatives", ["in_batch", "popularity"])
def test_chunked_sampled_loss_equals_one_block(negatives):
    hidden, weight, bias, labels = _params()
    results = []
    for memory_mb in (None, 2 * 3 * 4 * 8 / 2 ** 20):  # one block | about 2 rows per chunk
        sm = _softmax(sampled_negatives=negatives, ce_memory_mb=memory_mb)
        torch.manual_seed(5)
        loss = sm(hidden, labels, lambda ids: weight[ids], lambda ids: bias[ids])
        results.append((loss.detach(), torch.autograd.grad(loss, [hidden, weight, bias])))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_full_softmax_and_eval_mode_are_the_exact_loss():
    hidden, weight, bias, labels = _params()
    expected = F.cross_entropy(hidden @ weight.t() + bias, labels)
    full = _softmax(softmax="full")
    assert torch.allclose(full(hidden, labels, lambda ids: weight[ids], lambda ids: bias[ids]), expected, atol=1e-6)
    sampled = _softmax().eval()  # validation losses, if anyone asks, are exact
    assert torch.allclose(sampled(hidden, labels, lambda ids: weight[ids], lambda ids: bias[ids]), expected, atol=1e-6)


@pytest.mark.parametrize("key,value", [("softmax", "sampeld"), ("sampled_negatives", "batch"),
                                       ("n_sampled_negatives", 0)])
def test_bad_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        _softmax(**{key: value})


# ---------------------------------------------------------------------- the models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("softmax")
    config, _dataset, (train, _v, _t) = build_tiny(root, "TSSR", n_layers=1, n_heads=2, hidden_size=16,
                                                   inner_size=32)
    return root, config, train


@pytest.fixture(scope="module")
def tiny_content(tmp_path_factory):
    root = tmp_path_factory.mktemp("softmax_content")
    config, _dataset, (train, _v, _t) = build_tiny(root, "ContentSASRec", n_layers=1, n_heads=2,
                                                   hidden_size=16, inner_size=32)
    return root, config, train


def _grad_rows(model, loss, table):
    model.zero_grad()
    loss.backward()
    return set((table.grad.abs().sum(1) > 0).nonzero().flatten().tolist())


@pytest.mark.parametrize("classifier", ["linear", "id"])
def test_tssr_sampled_softmax_trains_only_candidate_rows(tiny_models, classifier):
    from recbole_mm.model.tssr import TSSR

    _root, config, train = tiny_models
    batch = next(iter(train))
    model = instantiate(config, train, TSSR, softmax="sampled", sampled_negatives="in_batch",
                        classifier=classifier, lambda_u=0.0, lambda_i=0.0)
    model.train()
    (loss,) = model.calculate_loss(batch)
    assert torch.isfinite(loss)
    labels = model.position_labels(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], batch[model.POS_ITEM_ID])
    cands = set(labels[labels > 0].tolist())
    table = model.classifier.weight if classifier == "linear" else model.item_embedding.weight
    rows = _grad_rows(model, loss, table)
    if classifier == "linear":
        assert rows == cands  # the classifier's rows of non-candidates get no gradient
    else:
        assert cands <= rows  # (the ID table is also the sequence input)
    # log-Q buffers never go into a checkpoint; scores are the full ranking as before
    assert not any("log_q" in k or "probs" in k for k in model.state_dict())
    full = instantiate(config, train, TSSR, classifier=classifier, lambda_u=0.0, lambda_i=0.0)
    full.load_state_dict(model.state_dict())
    model.eval()
    assert torch.equal(model.full_sort_predict(batch), full.full_sort_predict(batch))


def test_tssr_full_softmax_unchanged(tiny_models):
    """softmax: full (default) is the exact CE at every position, as before."""
    from recbole_mm.model.tssr import TSSR

    _root, config, train = tiny_models
    batch = next(iter(train))
    model = instantiate(config, train, TSSR, lambda_u=0.0, lambda_i=0.0)
    (loss,) = model.calculate_loss(batch)
    out = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    labels = model.position_labels(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], batch[model.POS_ITEM_ID])
    valid = labels > 0
    assert torch.allclose(loss, F.cross_entropy(model.logits(out["e"][valid]), labels[valid]), atol=1e-6)


@pytest.mark.parametrize("model_name", ["ContentSASRec", "IDContentSASRec"])
def test_content_baselines_sampled_softmax(tiny_content, model_name):
    from recbole_mm.model import baselines

    _root, config, train = tiny_content
    cls = getattr(baselines, model_name)
    batch = next(iter(train))
    full = instantiate(config, train, cls)
    loss_full = full.calculate_loss(batch)
    seq = full.forward(batch[full.ITEM_SEQ], batch[full.ITEM_SEQ_LEN])
    expected = F.cross_entropy(seq @ full.all_item_vectors().t(), batch[full.POS_ITEM_ID])
    assert torch.allclose(loss_full, expected, atol=1e-6)
    model = instantiate(config, train, cls, softmax="sampled", sampled_negatives="uniform", n_sampled_negatives=8)
    model.train()
    loss = model.calculate_loss(batch)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.content.parameters())


def test_sicsrec_sampled_softmax(tmp_path):
    from recbole_mm.model.sicsrec import SICSRec

    config, _dataset, (train, _v, _t) = build_tiny(
        tmp_path, "SICSRec", stage1=False, n_layers=1, n_heads=2, hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
        item_dropout_prob=0.0)
    batch = next(iter(train))
    losses = {}
    for mode in ("full", "sampled"):
        cfg = copy.deepcopy(config)
        cfg["softmax"] = mode
        torch.manual_seed(0)
        model = SICSRec(cfg, train._dataset)
        model.train()
        model.item_dropout.p = 0.0
        losses[mode] = model.ce_loss(model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]),
                                     batch[model.POS_ITEM_ID])
    target = batch[model.POS_ITEM_ID]
    s = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    assert torch.allclose(losses["full"], F.cross_entropy(model.logits(s), target), atol=1e-5)
    # in-batch: the batch's targets only, each logit lowered by log q
    cands, idx = torch.unique(target, return_inverse=True)
    logits = s @ model.item_matrix()[cands].t() / model.tau - model.softmax.log_q[cands]
    assert torch.allclose(losses["sampled"], F.cross_entropy(logits, idx), atol=1e-5)
