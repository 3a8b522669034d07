"""UniSRec (recbole_mm.model.unisrec): causality, padding invariance, the MoE adaptor (gate, noise,
whitening), per-loss gradients, inductive vs transductive fine-tuning with cold items, the
sequence-sequence contrastive term, sampled softmax, and one run through the runner."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_mm.model.layers import ItemIDEmbedding, MissingContent
from recbole_mm.model.unisrec import MoEAdaptor, UniSRec
from recbole_mm.quick_start import run_recbole_mm
from recbole_mm.registry import get_model, get_spec

from conftest import FAST, build_tiny, future_changed, instantiate

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ["inductive_ft", "transductive_ft"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Config, dataset and train/test loaders on a tiny dataset (text features extracted once)."""
    root = tmp_path_factory.mktemp("unisrec")
    config, dataset, (train, _valid, test) = build_tiny(
        root, "UniSRec", hidden_dropout_prob=0.0, attn_dropout_prob=0.0, n_layers=2, n_heads=2)
    return config, dataset, train, test, root


@pytest.fixture(scope="module")
def built_cold(tmp_path_factory):
    """The same with 30% of the items held out of training (cold items)."""
    root = tmp_path_factory.mktemp("unisrec_cold")
    config, dataset, (train, _valid, test) = build_tiny(
        root, "UniSRec", cold_items=0.3, hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    return config, dataset, train, test, root


def make(built, **overrides):
    config, _dataset, train = built[:3]
    return instantiate(config, train, UniSRec, **overrides)


def first_batch(built):
    return next(iter(built[2]))


def scores_of(model, seq, length):
    with torch.no_grad():
        return model.full_sort_predict(Interaction({"item_id_list": seq, "item_length": length}))


def randomise_adaptor(model, seed=1):
    """Non-trivial gate / noise / whitening weights (they start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    moe = model.moe_adaptor
    with torch.no_grad():
        moe.gate_weight.copy_(torch.randn(moe.gate_weight.shape, generator=gen))
        moe.whitening_bias.copy_(0.1 * torch.randn(moe.whitening_bias.shape, generator=gen))
        if moe.noise_weight is not None:
            moe.noise_weight.copy_(torch.randn(moe.noise_weight.shape, generator=gen))


# ----------------------------------------------------------------------------- spec and defaults


def test_spec_and_yaml_defaults(built):
    config, dataset = built[0], built[1]
    spec = get_spec("UniSRec")
    assert get_model("UniSRec") is UniSRec
    assert spec.role == "proposed" and spec.trim_safe
    assert spec.dataset == "recbole_mm.data.dataset:MultiModalSequentialDataset"
    assert UniSRec.required_features(config) == ["text"] and dataset.mm_features["text"].shape == (31, 384)
    assert config["n_exps"] == 8 and config["temperature"] == 0.07 and config["train_stage"] == "inductive_ft"
    assert config["adaptor_noise"] is True and config["adaptor_dropout_prob"] == 0.2
    assert config["seq_contrast_weight"] == 0.0 and config["item_drop_ratio"] == 0.2


def test_bad_settings_are_errors(built):
    for key, value, match in (("train_stage", "pretrain", "train_stage must be one of"),
                              ("n_exps", 0, "n_exps"), ("temperature", 0.0, "temperature"),
                              ("item_drop_ratio", 1.0, "item_drop_ratio"), ("loss_type", "BPR", "loss_type")):
        with pytest.raises((ValueError, NotImplementedError), match=match):
            make(built, **{key: value})


# ----------------------------------------------------------------------------- the sequence encoder


@pytest.mark.parametrize("stage", STAGES)
def test_no_future_leakage(built, stage):
    model = make(built, train_stage=stage)
    randomise_adaptor(model)
    t = 2
    seq, length, changed = future_changed(first_batch(built), t)  # other real items after position t
    with torch.no_grad():
        a, c = model.sequence_output(seq), model.sequence_output(changed)
    torch.testing.assert_close(a[:, : t + 1], c[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], c[:, t + 1:])  # the change is visible later
    prefix = torch.full_like(length, t + 1)
    torch.testing.assert_close(scores_of(model, seq, prefix), scores_of(model, changed, prefix), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_padding_never_changes_scores(built, stage):
    model = make(built, train_stage=stage)
    randomise_adaptor(model)
    inter = first_batch(built)
    seq, length = inter["item_id_list"], inter["item_length"]
    short = length < seq.size(1) - 2
    seq, length = seq[short][:8], length[short][:8]
    assert len(seq) >= 2
    base = scores_of(model, seq, length)
    junk = seq.clone()  # real item ids in the padding slots
    for b in range(junk.size(0)):
        junk[b, int(length[b]):] = 7
    width = int(length.max())
    other = make(built, train_stage=stage)  # another text row (and ID row) for the PAD item
    randomise_adaptor(other)
    with torch.no_grad():
        other.plm_embedding.weight[0] = torch.randn(384)
        if stage == "transductive_ft":
            other.item_embedding.weight[0] = torch.randn(other.hidden_size)
    for s in (scores_of(model, junk, length), scores_of(model, seq[:, :width], length), scores_of(other, seq, length)):
        torch.testing.assert_close(base, s, rtol=0, atol=1e-4)
    torch.testing.assert_close(scores_of(model, seq[:1], length[:1]), base[:1], rtol=0, atol=1e-4)  # alone


# ----------------------------------------------------------------------------- the MoE adaptor


def test_adaptor_is_the_gated_sum_of_whitened_experts(built):
    model = make(built)
    randomise_adaptor(model)
    moe = model.moe_adaptor
    assert isinstance(moe, MoEAdaptor) and moe.n_exps == 8
    ids = torch.tensor([1, 4, 9, 30])
    x = model.plm_embedding(ids)
    with torch.no_grad():
        g = moe.gates(x)
        assert g.shape == (4, 8) and (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(4))
        torch.testing.assert_close(g, torch.softmax(x @ moe.gate_weight, -1))  # eval: no noise
        by_hand = sum(g[:, k:k + 1] * ((x - moe.whitening_bias[k]) @ moe.expert_weight[k]) for k in range(8))
        torch.testing.assert_close(moe(x), by_hand, rtol=1e-4, atol=1e-5)
        # inductive: the item vector is the adaptor's output; PAD is the zero vector
        torch.testing.assert_close(model.item_vectors(ids), by_hand, rtol=1e-4, atol=1e-5)
        assert float(model.item_vectors(torch.tensor([0])).abs().sum()) == 0.0


def test_noise_and_dropout_only_in_training(built):
    model = make(built)
    randomise_adaptor(model)
    moe = model.moe_adaptor
    x = model.plm_embedding(torch.arange(1, 31))
    inter = first_batch(built)
    with torch.no_grad():
        # eval: deterministic gates, item vectors and scores
        assert torch.equal(moe.gates(x), moe.gates(x))
        assert torch.equal(model.all_item_vectors(), model.all_item_vectors())
        s1 = model.full_sort_predict(inter)
        torch.manual_seed(123)
        assert torch.equal(s1, model.full_sort_predict(inter))
        # training: noisy gates (still summing to 1) and dropped features
        model.train()
        g1, g2 = moe.gates(x), moe.gates(x)
        assert not torch.allclose(g1, g2)
        torch.testing.assert_close(g1.sum(-1), torch.ones(30))
        assert not torch.allclose(moe.experts(x), moe.experts(x))
    # adaptor_noise: False: no noise parameters, training gates = eval gates
    quiet = make(built, adaptor_noise=False, adaptor_dropout_prob=0.0)
    randomise_adaptor(quiet)
    assert quiet.moe_adaptor.noise_weight is None
    assert not any("noise" in n for n, _ in quiet.named_parameters())
    with torch.no_grad():
        g_eval = quiet.moe_adaptor.gates(x)
        quiet.train()
        torch.testing.assert_close(quiet.moe_adaptor.gates(x), g_eval)


# ----------------------------------------------------------------------------- gradients and stages


@pytest.mark.parametrize("stage", STAGES)
def test_gradients_reach_the_adaptor_and_transformer_never_the_text_table(built, stage):
    model = make(built, train_stage=stage)
    names = {n for n, _ in model.named_parameters()}
    if stage == "inductive_ft":
        assert not hasattr(model, "item_embedding") and not any("item_embedding" in n for n in names)
        big = [n for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and p.size(0) == model.n_items]
        assert big == []  # no per-item trainable table at all
    else:
        assert "item_embedding.weight" in names
    table = model.plm_embedding.weight
    assert not table.requires_grad
    assert "plm_embedding.weight" not in model.state_dict()  # frozen table kept out of checkpoints
    model.train()
    loss = model.calculate_loss(first_batch(built))
    assert torch.is_tensor(loss) and loss.dim() == 0 and model.loss_names == ("ce",)
    loss.backward()
    params = dict(model.named_parameters())
    expect = ["moe_adaptor.whitening_bias", "moe_adaptor.expert_weight", "moe_adaptor.gate_weight",
              "moe_adaptor.noise_weight", "position_embedding.weight", "LayerNorm.weight",
              "trm_encoder.layer.0.multi_head_attention.query.weight", "trm_encoder.layer.1.feed_forward.dense_2.weight"]
    if stage == "transductive_ft":
        expect.append("item_embedding.weight")
    for name in expect:
        grad = params[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert table.grad is None


def test_transductive_adds_the_id_embedding(built):
    model = make(built, train_stage="transductive_ft")
    ids = torch.tensor([[2, 5, 0]])
    with torch.no_grad():
        expected = model.moe_adaptor(model.plm_embedding(ids)) + model.item_embedding(ids)
        expected[0, 2] = 0.0
        torch.testing.assert_close(model.item_vectors(ids), expected)


def test_loss_is_the_ce_of_the_scores(built):
    """Eval mode (no dropout, no noise): the training CE is the cross-entropy of full_sort_predict's
    logits cos(s, v_i) / temperature; predict agrees with full_sort_predict."""
    for stage in STAGES:
        model = make(built, train_stage=stage)
        randomise_adaptor(model)
        inter = first_batch(built)
        with torch.no_grad():
            scores = model.full_sort_predict(inter)
            assert scores[:, 1:].abs().max() <= 1.0 / 0.07 + 1e-4  # cosines over the temperature
            torch.testing.assert_close(model.calculate_loss(inter), F.cross_entropy(scores, inter["item_id"]))
            one = model.predict(Interaction({"item_id_list": inter["item_id_list"][:4],
                                             "item_length": inter["item_length"][:4],
                                             "item_id": torch.tensor([1, 5, 9, 30])}))
            torch.testing.assert_close(one, scores[torch.arange(4), torch.tensor([1, 5, 9, 30])])


def test_cold_items_transductive_rows_get_no_gradient_inductive_scored_from_text(built_cold):
    config, dataset = built_cold[0], built_cold[1]
    cold = torch.from_numpy(dataset.cold_items)
    assert cold.sum() > 0
    model = make(built_cold, train_stage="transductive_ft")
    assert isinstance(model.item_embedding, ItemIDEmbedding) and model.softmax.excluded is not None
    model.train()
    model.calculate_loss(first_batch(built_cold)).backward()
    grad = model.item_embedding.weight.grad
    assert grad is not None and not grad[cold].any() and grad[~cold].abs().sum() > 0
    # evaluation: the cold items' own (untrained) ID rows never change a score
    model.eval()
    batch = next(iter(built_cold[3]))[0]
    with torch.no_grad():
        before = model.full_sort_predict(batch)
        model.item_embedding.weight[cold] = torch.randn(int(cold.sum()), model.hidden_size) * 10
        after = model.full_sort_predict(batch)
    torch.testing.assert_close(before, after, rtol=0, atol=1e-4)
    # inductive: no ID table; a cold item is scored from its own text, each differently
    model = make(built_cold)
    assert not hasattr(model, "item_embedding")
    with torch.no_grad():
        s = model.full_sort_predict(batch)[:, cold]
    assert torch.isfinite(s).all() and not torch.allclose(s, s[:, :1].expand_as(s))


def test_missing_modality_replaces_the_adaptor_output(built):
    model = make(built, missing_modality="learned")
    assert isinstance(model.missing, MissingContent)
    mask = model.missing.get_buffer("mask_text")
    mask[3] = True  # pretend item 3 has no text
    with torch.no_grad():
        torch.testing.assert_close(model.item_vectors(torch.tensor([3])), model.missing.vectors["text"][None])
        assert not torch.allclose(model.item_vectors(torch.tensor([4])), model.missing.vectors["text"][None])
    assert make(built).missing is None


# ----------------------------------------------------------------------------- losses and softmax


def test_item_drop_views(built):
    model = make(built)
    inter = first_batch(built)
    seq, length = inter["item_id_list"], inter["item_length"]
    torch.manual_seed(0)
    view, n = model.item_drop(seq, length)
    assert ((n >= 1) & (n <= length)).all() and (n < length).any()
    for b in range(seq.size(0)):
        kept, orig = view[b, :int(n[b])].tolist(), seq[b, :int(length[b])].tolist()
        it = iter(orig)
        assert all(k in it for k in kept)  # an order-preserving subsequence
        assert not view[b, int(n[b]):].any()  # right padding
    same = make(built, item_drop_ratio=0.0)
    view, n = same.item_drop(seq, length)
    assert torch.equal(view, seq) and torch.equal(n, length)


def test_seq_contrast_adds_a_second_term_with_gradients(built):
    model = make(built, seq_contrast_weight=0.1)
    assert model.loss_names == ("ce", "seq_contrast")
    model.train()
    inter = first_batch(built)
    loss = model.calculate_loss(inter)
    assert isinstance(loss, tuple) and len(loss) == 2 and all(torch.isfinite(t) for t in loss)
    model.zero_grad()
    loss[1].backward()
    for name, p in model.named_parameters():
        if name.startswith(("moe_adaptor.", "trm_encoder.", "position_embedding")):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    # the term by hand: InfoNCE of view 1 against the batch's views 2 (same random draws)
    seq, length = inter["item_id_list"], inter["item_length"]
    model.eval()
    torch.manual_seed(5)
    got = model.seq_contrast_loss(seq, length)
    torch.manual_seed(5)
    a = F.normalize(model(*model.item_drop(seq, length)), dim=-1)
    b = F.normalize(model(*model.item_drop(seq, length)), dim=-1)
    torch.testing.assert_close(got, F.cross_entropy(a @ b.t() / 0.07, torch.arange(len(seq))))
    # trimmed batches draw the same views as padded ones
    width = int(length.max())
    assert width < model.max_seq_length  # else padded and trimmed would be the same input
    with torch.no_grad():
        torch.manual_seed(9)
        padded = torch.nn.functional.pad(seq[:, :width], (0, model.max_seq_length - width))
        lp = model.calculate_loss(Interaction({"item_id_list": padded, "item_length": length, "item_id": inter["item_id"]}))
        torch.manual_seed(9)
        lt = model.calculate_loss(Interaction({"item_id_list": seq[:, :width], "item_length": length,
                                               "item_id": inter["item_id"]}))
    for x, y in zip(lp, lt):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("negatives", ["in_batch", "uniform"])
def test_sampled_softmax(built, negatives):
    model = make(built, softmax="sampled", sampled_negatives=negatives, n_sampled_negatives=8,
                 logq_correction=False, train_stage="transductive_ft")
    assert model.softmax.sampled
    inter = first_batch(built)
    model.train()
    loss = model.calculate_loss(inter)
    assert torch.isfinite(loss)
    loss.backward()
    assert float(model.moe_adaptor.expert_weight.grad.abs().sum()) > 0
    assert float(model.item_embedding.weight.grad.abs().sum()) > 0
    if negatives == "in_batch":
        # eval-free check (no dropout difference): adaptor dropout and noise off, then by hand
        quiet = make(built, softmax="sampled", logq_correction=False, adaptor_noise=False, adaptor_dropout_prob=0.0)
        quiet.train()
        target = inter["item_id"]
        with torch.no_grad():
            s = F.normalize(quiet(inter["item_id_list"], inter["item_length"]), dim=-1)
            cand, idx = torch.unique(target, return_inverse=True)
            v = F.normalize(quiet.item_vectors(cand), dim=-1)
            torch.testing.assert_close(quiet.calculate_loss(inter), F.cross_entropy(s @ v.t() / 0.07, idx))


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_run(built, workdir):
    root = built[4]  # reuse the folder whose text features are already extracted
    record = workdir / "UniSRec.json"
    result = run_recbole_mm(model="UniSRec", dataset="tiny", config_dict=dict(
        FAST, data_path=str(root / "data"), checkpoint_dir=str(workdir / "saved"), epochs=2,
        seq_contrast_weight=0.1, record_path=str(record)))
    assert set(result["test_result"]) >= {"hit@10", "ndcg@10"}
    assert 0.0 <= float(result["test_result"]["hit@10"]) <= 1.0
    rec = json.load(open(record))
    assert rec["status"] == "finished" and rec["model"] == "UniSRec"
    assert len(rec["history"]["valid_score"]) == 2
