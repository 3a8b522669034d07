"""TSSR correctness: causality, padding invariance, per-loss gradients, overfitting,
finetune mode, and end-to-end runs through the Python API and the CLI."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_mm.model.tssr import TSSR

from conftest import FAST, REPO, build_tiny, future_changed, instantiate, write_tiny_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Config, dataset and train loader for TSSR on a tiny dataset (text features extracted once)."""
    config, dataset, (train, _valid, _test) = build_tiny(
        tmp_path_factory.mktemp("tssr"), "TSSR",
        hidden_dropout_prob=0.0, attn_dropout_prob=0.0, input_dropout_prob=0.0)
    return config, dataset, train


def make_model(built, **overrides):
    config, _dataset, train = built
    return instantiate(config, train, TSSR, **overrides)


def batch(built):
    _, _, train = built
    return next(iter(train))


def test_dataset_keeps_catalog_and_sliding_windows(built):
    config, dataset, train = built
    # features never enlarge the candidate set: 30 items + PAD, as a plain SASRec dataset
    assert dataset.item_num == 31
    assert dataset.mm_features["text"].shape == (31, 384)
    assert bool(dataset.mm_missing["text"][0]) and not dataset.mm_missing["text"][1:].any()
    assert float(dataset.mm_features["text"][0].abs().sum()) == 0.0
    # sliding windows: targets MAX_ITEM_LIST_LENGTH apart, ending at the last training item
    inter = train._dataset.inter_feat
    assert len(inter) < sum(1 for _ in range(len(inter))) + 1
    uids = inter["user_id"].numpy()
    assert len(set(uids)) == 40  # every user keeps its last window


def test_no_future_leakage(built):
    model = make_model(built)
    # take sequences with at least 4 items and change everything after position t=2 (other real items)
    t = 2
    seq, length, changed = future_changed(batch(built), t)
    with torch.no_grad():
        a = model(seq, length)
        c = model(changed, length)
    assert not torch.allclose(a["e"][:, t + 1:], c["e"][:, t + 1:])  # the change is visible later
    for key in ("e", "h_id", "h_c"):
        torch.testing.assert_close(a[key][:, : t + 1], c[key][:, : t + 1], rtol=0, atol=1e-6)


def test_padding_never_changes_scores(built):
    model = make_model(built)
    inter = batch(built)
    seq, length = inter["item_id_list"], inter["item_length"]
    short = length < seq.size(1) - 2
    seq, length = seq[short][:8], length[short][:8]
    data = Interaction({"item_id_list": seq, "item_length": length})
    with torch.no_grad():
        base = model.full_sort_predict(data)
        # 1. garbage ids in the padding slots after the sequence end
        junk = seq.clone()
        for b in range(junk.size(0)):
            junk[b, int(length[b]):] = 7
        s1 = model.full_sort_predict(Interaction({"item_id_list": junk, "item_length": length}))
        # 2. less padding (a narrower batch)
        width = int(length.max())
        m2 = make_model(built)
        s2 = m2.full_sort_predict(Interaction({"item_id_list": seq[:, :width], "item_length": length}))
        # 3. a different content row for the PAD item
        model.content.tables["text"].weight[0] = torch.randn(384)
        s3 = model.full_sort_predict(data)
    for other in (s1, s2, s3):
        torch.testing.assert_close(base, other, rtol=0, atol=1e-5)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad is not None and float(p.grad.abs().sum()) > 0) for n, p in model.named_parameters()}


def _group(grads, prefix):
    return [v for n, v in grads.items() if n.startswith(prefix)]


def test_each_loss_sends_gradients_where_it_should(built):
    model = make_model(built, lambda_u=1.0, lambda_i=1.0)
    model.train()
    inter = batch(built)
    torch.manual_seed(0)
    l_ce, l_u, l_i = model.calculate_loss(inter)

    g = _grads(model, l_ce)
    assert all(_group(g, "classifier")) and any(_group(g, "gate")) and any(_group(g, "cross_id"))
    assert any(_group(g, "cross_content")) and any(_group(g, "item_embedding"))
    assert any(_group(g, "content.proj")) and not any(_group(g, "content.tables"))

    l_ce, l_u, l_i = model.calculate_loss(inter)
    g = _grads(model, l_u)
    assert any(_group(g, "id_encoder")) and any(_group(g, "content_encoder")) and any(_group(g, "content.proj"))
    for none in ("classifier", "gate", "cross_id", "cross_content", "content.tables"):
        assert not any(_group(g, none)), none

    l_ce, l_u, l_i = model.calculate_loss(inter)
    g = _grads(model, l_i)
    assert any(_group(g, "item_embedding")) and any(_group(g, "content.proj"))
    assert any(_group(g, "id_encoder")) and any(_group(g, "content_encoder"))
    for none in ("classifier", "gate", "cross_id", "cross_content", "content.tables"):
        assert not any(_group(g, none)), none
    # the frozen feature table is never a trainable parameter
    assert not model.content.tables["text"].weight.requires_grad


def test_item_loss_masks_duplicate_next_items(built):
    model = make_model(built)
    anchors = torch.randn(3, 2, 16)
    cands = torch.randn(3, 2, 16)
    labels = torch.tensor([[5, 0], [5, 3], [6, 3]])
    masked = model._item_direction(anchors, cands, labels, labels, 0)
    model.li_mask_duplicates = False
    faithful = model._item_direction(anchors, cands, labels, labels, 0)
    # with masking, rows whose only negatives are duplicates have zero loss
    a, c = anchors.transpose(0, 1), cands.transpose(0, 1)
    logits = torch.bmm(a, c.transpose(1, 2))
    # position 0: labels 5,5,6 -> rows 0 and 1 exclude each other; position 1: labels 0,3,3
    row_losses = []
    for t, valid_cols in ((0, [[0, 2], [1, 2], [0, 1, 2]]), (1, [[], [1], [2]])):
        for i in range(3):
            if int(labels[i, t]) == 0:
                continue
            cols = valid_cols[i]
            row = logits[t, i, cols]
            row_losses.append(-(row[cols.index(i)] - torch.logsumexp(row, 0)))
    torch.testing.assert_close(masked, torch.stack(row_losses).mean())
    assert not torch.isclose(masked, faithful)


def test_position_labels():
    seq = torch.tensor([[3, 4, 5, 0], [7, 0, 0, 0]])
    labels = TSSR.position_labels(seq, torch.tensor([3, 1]), torch.tensor([9, 8]))
    assert labels.tolist() == [[4, 5, 9, 0], [8, 0, 0, 0]]


def test_tiny_model_overfits_tiny_data(built):
    model = make_model(built, lambda_u=0.1, lambda_i=0.1)
    model.train()
    inter = batch(built)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(150):
        opt.zero_grad()
        loss = sum(model.calculate_loss(inter))
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(inter["item_id_list"], inter["item_length"])
        labels = TSSR.position_labels(inter["item_id_list"], inter["item_length"], inter["item_id"])
        valid = labels > 0
        pred = model.logits(out["e"][valid]).argmax(-1)
    acc = (pred == labels[valid]).float().mean().item()
    assert acc > 0.95, acc


def test_finetune_updates_only_top_layers(built):
    model = make_model(built, content_mode="finetune", encoder_trainable_layers=1, encoder_max_length=16,
                       encoder_learning_rate=1e-3)
    enc = model.content.text.encoder
    n = len(enc.encoder.layer)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    trainable = {k for k, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith(f"encoder.layer.{n - 1}.") for k in trainable)
    groups = model.optimizer_param_groups()
    assert groups[1]["lr"] == 1e-3 and len(groups[1]["params"]) == len(trainable)

    # the cached lower layers + top layer reproduce the plain encoder forward
    text = model.content.text
    rows = torch.tensor([1, 2, 3])
    with torch.no_grad():
        split = text._encode_rows(rows)
        ids, mask = text.input_ids[rows], text.attention_mask[rows]
        full = enc(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        ref = (full * m).sum(1) / m.sum(1)
    torch.testing.assert_close(split, ref, rtol=1e-4, atol=1e-4)

    model.train()
    opt = torch.optim.Adam(groups, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum(model.calculate_loss(batch(built))).backward()
        opt.step()
    after = enc.state_dict()
    for k, v in before.items():
        if k in trainable:
            continue
        assert torch.equal(v, after[k]), f"frozen encoder tensor changed: {k}"
    assert any(not torch.equal(before[k], after[k]) for k in trainable)


def test_tssr_cli_end_to_end(workdir):
    write_tiny_dataset(workdir / "data")
    args = [f"--{k}={v}" for k, v in dict(FAST, epochs=2).items()] + [
        f"--data_path={workdir / 'data'}", "--model=TSSR", "--dataset=tiny",
    ]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "run_recbole_mm.py")] + args,
                          capture_output=True, text=True, timeout=300, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test result:" in proc.stdout and "ndcg@10" in proc.stdout
    assert os.path.isfile(workdir / "data" / "tiny" / "tiny.text.npy")


def test_last_position_forward_equals_full_forward(built):
    """Scoring runs the cross stacks only at the last position; it must equal the full forward."""
    model = make_model(built)
    inter = batch(built)
    seq, length = inter["item_id_list"], inter["item_length"]
    with torch.no_grad():
        full = model(seq, length)["e"]
        fast = model(seq, length, query_positions=length - 1)["e"][:, 0]
        ref = full[torch.arange(seq.size(0)), length - 1]
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.full_sort_predict(inter), model.logits(ref), rtol=1e-5, atol=1e-5)
        last = make_model(built, ce_positions="last", lambda_u=0.0, lambda_i=0.0)
        (l_ce,) = last.calculate_loss(inter)
        expected = torch.nn.functional.cross_entropy(
            last.logits(last(seq, length)["e"][torch.arange(seq.size(0)), length - 1]), inter["item_id"])
        torch.testing.assert_close(l_ce, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["id", "id_content"])
def test_tied_classifiers_score_with_item_vectors(built, kind):
    """``classifier: id`` scores with the ID embeddings (SASRec's tied output), ``id_content`` with
    ID embedding + projected content; PAD scores 0, padding and later items change nothing."""
    model = make_model(built, classifier=kind)
    assert model.classifier is None
    inter = batch(built)
    seq, length = inter["item_id_list"], inter["item_length"]
    with torch.no_grad():
        e = model(seq, length, query_positions=length - 1)["e"][:, 0]
        w = model.item_embedding.weight.clone()
        if kind == "id_content":
            w[1:] += model.content(torch.arange(1, model.n_items))
        scores = model.full_sort_predict(inter)
        torch.testing.assert_close(scores, e @ w.t(), rtol=1e-5, atol=1e-5)
        assert torch.all(scores[:, 0] == 0)
        junk = seq.clone()
        for b in range(junk.size(0)):
            junk[b, int(length[b]):] = 7
        model.content.tables["text"].weight[0] = torch.randn(384)
        again = model.full_sort_predict(Interaction({"item_id_list": junk, "item_length": length}))
        torch.testing.assert_close(scores, again, rtol=0, atol=1e-5)
    # the CE reaches the item vectors the scores use (no separate output layer to train)
    model.train()
    l_ce = model.calculate_loss(inter)[0]
    g = _grads(model, l_ce)
    assert any(_group(g, "item_embedding")) and any(_group(g, "content.proj"))
    assert not any(_group(g, "content.tables"))


def test_finetune_cache_is_bounded_and_exact(built):
    """encoder_cache_mb: the lower-layer cache holds only the items batches bring, within its budget;
    items past the budget are recomputed, and the encodings equal the unbounded cache's."""
    unbounded = make_model(built, content_mode="finetune", encoder_max_length=16, encoder_cache_mb=None)
    text = unbounded.content.text
    row_mb = text.input_ids.size(1) * text.out_dim * 4 / 2 ** 20
    bounded = make_model(built, content_mode="finetune", encoder_max_length=16, encoder_cache_mb=4 * row_mb)
    assert bounded.content.text.cache.capacity == 4 < bounded.n_items
    rows = torch.arange(1, 11)
    with torch.no_grad():
        for _ in range(2):  # second pass: 4 items read back, 6 recomputed
            a, b = unbounded.content.text(rows), bounded.content.text(rows)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert text.cache.used == 10 and bounded.content.text.cache.used == 4
    assert bounded.content.text.cache.store.size(0) == 4 and bounded.content.text.cache.uncached == 12


def test_id_content_classifier_refuses_finetune(built):
    with pytest.raises(ValueError, match="id_content"):
        make_model(built, classifier="id_content", content_mode="finetune")


@pytest.mark.parametrize("classifier", ["linear", "id"])
def test_chunked_ce_equals_one_shot(classifier):
    """ce_memory_mb: TSSR's all-position CE in chunks of positions (recomputed in backward) gives the
    one-shot loss and gradients."""
    from recbole_mm.model.layers import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(37, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True) if classifier == "linear" else None
    labels = torch.randint(1, 50, (37,))
    grads = []
    for memory_mb in (None, 5 * 3 * 4 * 50 / 2 ** 20):  # one block | 5 rows per chunk
        loss = chunked_cross_entropy(hidden, weight, labels, bias=bias, memory_mb=memory_mb)
        params = [hidden, weight] + ([bias] if bias is not None else [])
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    expected = F.cross_entropy(hidden @ weight.t() + (bias if bias is not None else 0), labels)
    assert torch.allclose(l1, expected, atol=1e-6)


def test_tssr_loss_with_a_tiny_ce_budget_equals_one_block(workdir):
    config, _, (train, _, _) = build_tiny(workdir, "TSSR")
    batch = next(iter(train))
    losses = []
    for memory_mb in (None, 1e-4):  # one block | a few positions per chunk
        model = instantiate(config, train, TSSR, ce_memory_mb=memory_mb)
        losses.append(model.calculate_loss(batch)[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_frozen_feature_tables_stay_out_of_checkpoints(workdir):
    """The state_dict carries a checksum instead of each frozen feature table; loading checks it."""
    config, dataset, (train, _, _) = build_tiny(workdir, "TSSR")
    model = instantiate(config, train, TSSR)
    state = model.state_dict()
    assert not [k for k in state if k.startswith("content.tables.") and k.endswith(".weight")]
    digest_key = "content.tables.text.sha256"
    assert state[digest_key].dtype == torch.uint8 and state[digest_key].numel() == 32
    fresh = instantiate(config, train, TSSR)
    fresh.load_state_dict(state)  # strict: the table is the model's own
    assert torch.equal(fresh.content.tables["text"].weight, model.content.tables["text"].weight)
    old_style = dict(state)  # a checkpoint written before: the table itself, no checksum
    old_style.pop(digest_key)
    old_style["content.tables.text.weight"] = model.content.tables["text"].weight.detach().clone()
    fresh.load_state_dict(old_style)
    other = dict(state)
    other[digest_key] = torch.zeros(32, dtype=torch.uint8)  # trained on other features
    with pytest.raises(RuntimeError, match="other item features"):
        fresh.load_state_dict(other)


def test_blockwise_item_contrastive_equals_one_block(workdir):
    """contrastive_memory_mb: L_i over blocks of positions (recomputed in backward) gives the one-block
    loss and gradients."""
    config, _, (train, _, _) = build_tiny(workdir, "TSSR", lambda_i=1.0)
    batch = next(iter(train))
    results = []
    for memory_mb in (None, 1e-5):  # one block | one position per block
        model = instantiate(config, train, TSSR, contrastive_memory_mb=memory_mb)
        model.train()
        torch.manual_seed(0)  # same dropout masks
        loss = model.calculate_loss(batch)[-1]
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    assert torch.isfinite(l1) and l1 > 0 and torch.allclose(l1, l2, atol=1e-6)
    assert any(g is not None for g in g1)
    assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_activation_checkpointing_gives_the_same_loss_and_gradients(built):
    """activation_checkpointing: every block recomputed in backward (dropout replayed): same loss and
    gradients as keeping the activations, in training with dropout on."""
    inter = batch(built)
    results = []
    for flag in (False, True):
        model = make_model(built, activation_checkpointing=flag, hidden_dropout_prob=0.3, attn_dropout_prob=0.3,
                           rezero=False)
        assert all(m.checkpoint is flag for m in model.modules() if type(m).__name__ == "AttentionStack")
        model.train()
        torch.manual_seed(7)
        loss = sum(model.calculate_loss(inter))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
