"""The baselines multimodal papers compare against (ContentSASRec, IDContentSASRec):
padding invariance, no future leakage, frozen feature tables, and runs through the runner."""

import copy
import json
import os

import pytest
import torch
from recbole.data.interaction import Interaction

from recbole_mm.model.baselines import ContentSASRec, IDContentSASRec
from recbole_mm.quick_start import run_recbole_mm
from recbole_mm.registry import get_model, get_trainer

from conftest import FAST, build_tiny, future_changed, instantiate

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = [ContentSASRec, IDContentSASRec]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Config, dataset and train loader on a tiny dataset (text features extracted once)."""
    root = tmp_path_factory.mktemp("baselines")
    config, dataset, (train, _valid, _test) = build_tiny(
        root, "ContentSASRec", hidden_dropout_prob=0.0, attn_dropout_prob=0.0, n_layers=2, n_heads=2)
    return config, dataset, train, root


def make(built, cls, **overrides):
    config, _dataset, train, _root = built
    return instantiate(config, train, cls, **overrides)


def first_batch(built):
    return next(iter(built[2]))


def test_registry_and_yaml_defaults(built):
    assert get_model("ContentSASRec") is ContentSASRec and get_model("IDContentSASRec") is IDContentSASRec
    config = built[0]
    assert config["content_modality"] == "text" and config["text_feature"] == "text"
    assert config["n_layers"] == 2 and config["initializer_range"] == 0.02  # the plugin's YAML (+ FAST)
    assert ContentSASRec.required_features(config) == ["text"]
    assert built[1].mm_features["text"].shape == (31, 384)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_item_vectors_content_only_vs_id_plus_content(built, cls):
    model = make(built, cls)
    names = {n for n, _ in model.named_parameters()}
    if cls is ContentSASRec:
        # MoRec-style: no ID table at all; the only (n_items x d) matrix is the frozen feature table
        assert not hasattr(model, "item_embedding") and not any(n.startswith("item_embedding") for n in names)
        trainable_rows = [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and p.size(0) == model.n_items]
        assert trainable_rows == []
    else:
        assert "item_embedding.weight" in names
        ids = torch.tensor([[1, 2, 3]])
        expected = model.item_embedding(ids) + model.content(ids)
        torch.testing.assert_close(model.item_vectors(ids), expected)
    # PAD is the zero vector whatever the tables hold
    assert float(model.item_vectors(torch.tensor([0])).detach().abs().sum()) == 0.0
    # scoring uses the same vectors as the input: full_sort_predict == dot with all item vectors
    inter = first_batch(built)
    with torch.no_grad():
        out = model.forward(inter["item_id_list"][:4], inter["item_length"][:4])
        scores = model.full_sort_predict(Interaction({"item_id_list": inter["item_id_list"][:4],
                                                      "item_length": inter["item_length"][:4]}))
        torch.testing.assert_close(scores, out @ model.all_item_vectors().t())
        one = model.predict(Interaction({"item_id_list": inter["item_id_list"][:4],
                                         "item_length": inter["item_length"][:4],
                                         "item_id": torch.tensor([1, 5, 9, 30])}))
        torch.testing.assert_close(one, scores[torch.arange(4), torch.tensor([1, 5, 9, 30])])


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_padding_never_changes_scores(built, cls):
    model = make(built, cls)
    inter = first_batch(built)
    seq, length = inter["item_id_list"], inter["item_length"]
    short = length < seq.size(1) - 2
    seq, length = seq[short][:8], length[short][:8]
    assert len(seq) >= 2

    def scores(s, ln, m=model):
        with torch.no_grad():
            return m.full_sort_predict(Interaction({"item_id_list": s, "item_length": ln}))

    base = scores(seq, length)
    # 1. real item ids in the padding slots after the end of each sequence
    junk = seq.clone()
    for b in range(junk.size(0)):
        junk[b, int(length[b]):] = 7
    # 2. less padding (a narrower batch)
    width = int(length.max())
    # 3. a different feature row and ID row for the PAD item
    m3 = make(built, cls)
    with torch.no_grad():
        m3.content.tables["text"].weight[0] = torch.randn(384)
        if hasattr(m3, "item_embedding"):
            m3.item_embedding.weight[0] = torch.randn(m3.hidden_size)
    for other in (scores(junk, length), scores(seq[:, :width], length), scores(seq, length, m3)):
        torch.testing.assert_close(base, other, rtol=0, atol=1e-5)
    # 4. a sequence scores the same alone and inside a batch
    torch.testing.assert_close(scores(seq[:1], length[:1]), base[:1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_no_future_leakage(built, cls):
    model = make(built, cls)
    t = 2
    seq, length, changed = future_changed(first_batch(built), t)  # other real items after position t
    with torch.no_grad():
        a, c = model.sequence_output(seq), model.sequence_output(changed)
        # every position <= t is unchanged; the change is visible later
        torch.testing.assert_close(a[:, : t + 1], c[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t + 1:], c[:, t + 1:])
        # scoring a prefix of length t+1 ignores the (future) items still present in the tensor
        prefix = torch.full_like(length, t + 1)
        s1 = model.full_sort_predict(Interaction({"item_id_list": seq, "item_length": prefix}))
        s2 = model.full_sort_predict(Interaction({"item_id_list": changed, "item_length": prefix}))
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
def test_gradients_never_reach_the_frozen_feature_table(built, cls, loss_type):
    model = make(built, cls, loss_type=loss_type)
    model.train()
    table = model.content.tables["text"].weight
    before = table.detach().clone()
    assert not table.requires_grad
    inter = first_batch(built)
    if loss_type == "BPR":
        inter = copy.copy(inter)
        inter.update(Interaction({"neg_item_id": torch.randint(1, 31, (len(inter),))}))
    # the trainer's optimizer never holds the table
    trainer = get_trainer(built[0]["MODEL_TYPE"], cls.__name__)(built[0], model)
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(table) not in held
    for _ in range(3):
        trainer.optimizer.zero_grad()
        loss = model.calculate_loss(inter)
        loss.backward()
        assert table.grad is None
        assert model.content.proj["text"].weight.grad is not None
        assert float(model.content.proj["text"].weight.grad.abs().sum()) > 0
        if cls is IDContentSASRec:
            assert float(model.item_embedding.weight.grad.abs().sum()) > 0
        trainer.optimizer.step()
    assert torch.equal(table.detach(), before)


@pytest.mark.parametrize("model", ["ContentSASRec", "IDContentSASRec"])
def test_smoke_run_through_the_runner(built, workdir, model):
    root = built[3]  # reuse the folder whose text features are already extracted
    result = run_recbole_mm(model=model, dataset="tiny", config_dict=dict(
        FAST, data_path=str(root / "data"), checkpoint_dir=str(workdir / "saved"), epochs=2,
        record_path=str(workdir / f"{model}.json")))
    assert set(result["test_result"]) >= {"hit@10", "ndcg@10"}
    assert 0.0 <= float(result["test_result"]["hit@10"]) <= 1.0
    record = json.load(open(workdir / f"{model}.json"))
    assert record["status"] == "finished" and record["model"] == model
    assert len(record["history"]["valid_score"]) == 2
