"""Items without content (no text, no or an unreadable image) in the models.

``missing_modality: zero`` (default) is the behaviour before the switch: a missing item's zero
feature row is projected like any other, so all of them share one vector. ``learned`` replaces the
projection of a missing modality with one trained vector per modality, ``id`` with one trained
vector per missing item. Tested on tiny data whose items i3, i7, i12, i20 have no text (empty
fields), for TSSR, ContentSASRec, IDContentSASRec and SICSRec."""

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_mm.model.baselines import ContentSASRec, IDContentSASRec
from recbole_mm.model.layers import ContentProjector, MissingContent, dataset_missing_masks
from recbole_mm.model.sicsrec import SICSRec
from recbole_mm.model.tssr import TSSR

from conftest import FAST, write_tiny_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MISSING_TOKENS = ("i3", "i7", "i12", "i20")
PROJECTOR_MODELS = [TSSR, ContentSASRec, IDContentSASRec]
ALL_MODELS = PROJECTOR_MODELS + [SICSRec]


def _blank_items(folder, tokens):
    """Empty every text field of ``tokens`` in ``tiny.item``: those items have no text."""
    path = os.path.join(folder, "tiny.item")
    with open(path) as f:
        lines = f.read().splitlines()
    out = [lines[0]] + [(line.split("\t")[0] + "\t\t") if line.split("\t")[0] in tokens else line
                        for line in lines[1:]]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny dataset (4 items without text) and a config per model on it."""
    from recbole_mm.config import MMConfig
    from recbole_mm.data.lazy import data_preparation
    from recbole_mm.quick_start import create_dataset

    root = tmp_path_factory.mktemp("missing")
    old, argv = os.getcwd(), sys.argv
    os.chdir(root)
    sys.argv = ["pytest"]
    try:
        folder = write_tiny_dataset(root / "data", n_users=40, n_items=30)
        _blank_items(folder, MISSING_TOKENS)
        base = dict(FAST, data_path=str(root / "data"), checkpoint_dir=str(root / "saved"),
                    hidden_dropout_prob=0.0, attn_dropout_prob=0.0, input_dropout_prob=0.0, stage1=False)
        configs = {cls.__name__: MMConfig(model=cls.__name__, dataset="tiny", config_dict=base) for cls in ALL_MODELS}
        dataset = create_dataset(configs["ContentSASRec"])
        train, _valid, _test = data_preparation(configs["ContentSASRec"], dataset)
    finally:
        os.chdir(old)
        sys.argv = argv
    return configs, dataset, train


def make(built, cls, **overrides):
    """A fresh model (seed 0, eval mode); every model reads the same dataset's features."""
    configs, dataset, _train = built
    config = copy.deepcopy(configs[cls.__name__])
    for key, value in overrides.items():
        config[key] = value
    torch.manual_seed(0)
    model = cls(config, dataset)
    model.eval()
    return model


def missing_ids(built):
    dataset = built[1]
    token2id = dataset.field2token_id[dataset.iid_field]
    return torch.tensor(sorted(token2id[t] for t in MISSING_TOKENS))


def content_ids(built):
    miss = set(missing_ids(built).tolist())
    return torch.tensor([i for i in range(1, built[1].item_num) if i not in miss])


def item_vectors(model, ids):
    """The content-derived item vectors a model uses (TSSR, SICSRec: content vectors; baselines:
    the item vectors that are input and candidates)."""
    if isinstance(model, (TSSR, SICSRec)):
        return model.item_content(ids)
    return model.item_vectors(ids)


def missing_module(model):
    return model.missing_content if isinstance(model, SICSRec) else model.content.missing


def first_batch(built):
    inter = next(iter(built[2]))
    return Interaction({"item_id_list": inter["item_id_list"][:8], "item_length": inter["item_length"][:8],
                        "item_id": inter["item_id"][:8], "user_id": inter["user_id"][:8]})


# ---------------------------------------------------------------- the mask


def test_mask_comes_from_the_dataset_aligned_and_without_pad(built):
    dataset = built[1]
    miss = missing_ids(built)
    assert dataset.mm_missing["text"].sum() == len(MISSING_TOKENS) + 1  # + PAD
    masks = dataset_missing_masks(dataset, ["text"], "test")
    assert not masks["text"][0]  # PAD is not an item without content
    assert torch.equal(torch.nonzero(masks["text"]).flatten(), miss)
    # the dataset's tables: missing rows are zero rows
    assert float(dataset.mm_features["text"][miss].abs().sum()) == 0.0
    with pytest.raises(KeyError, match="missing-content masks"):
        dataset_missing_masks(dataset, ["image"], "test")


def test_default_is_zero(built):
    for cls in ALL_MODELS:
        assert built[0][cls.__name__]["missing_modality"] == "zero"


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_default_reproduces_the_previous_outputs(built, cls):
    """zero adds no parameter, buffer or random draw, and computes the content as before."""
    model = make(built, cls)
    assert missing_module(model) is None
    assert not [k for k in model.state_dict() if "missing" in k]
    assert not [n for n, _ in model.named_buffers() if "missing" in n]
    explicit = make(built, cls, missing_modality="zero")
    for (k, a), (k2, b) in zip(model.state_dict().items(), explicit.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    inter = first_batch(built)
    with torch.no_grad():
        scores = model.full_sort_predict(inter)
        # the content vectors as the code computed them before the switch
        if isinstance(model, SICSRec):
            def previous(ids):
                uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
                z = sum(model.content_mlps[m](model.content_tables[m](uniq)) for m in model.modalities)
                return F.normalize(z, dim=-1)[inverse].view(*ids.shape, -1)
            model.item_content = previous
        else:
            content = model.content
            content.forward = lambda ids: sum(content.proj[n](content.dropout(content.tables[n](ids)))
                                              for n in content.names)
        torch.testing.assert_close(model.full_sort_predict(inter), scores, rtol=0, atol=0)
        # every item without text has the same content vector
        ids = missing_ids(built)
        vec = explicit.item_content(ids) if isinstance(explicit, (TSSR, SICSRec)) else explicit.content(ids)
        assert torch.equal(vec, vec[:1].expand_as(vec))


# ---------------------------------------------------------------- learned


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_learned_replaces_only_missing_items(built, cls):
    zero = make(built, cls)
    learned = make(built, cls, missing_modality="learned")
    # same seed: every weight but the missing vector is the same as with zero
    z_state, l_state = zero.state_dict(), learned.state_dict()
    extra = sorted(set(l_state) - set(z_state))
    assert set(z_state) <= set(l_state) and len(extra) == 1 and "missing" in extra[0]
    for k in z_state:
        assert torch.equal(z_state[k], l_state[k]), k
    vector = dict(missing_module(learned).vectors.items())["text"]
    assert float(vector.detach().abs().sum()) > 0  # drawn at the end of __init__
    miss, have = missing_ids(built), content_ids(built)
    with torch.no_grad():
        torch.testing.assert_close(item_vectors(learned, have), item_vectors(zero, have), rtol=0, atol=0)
        got = item_vectors(learned, miss)
        if cls is TSSR or cls is ContentSASRec:
            expected = vector.expand(len(miss), -1)
        elif cls is IDContentSASRec:
            expected = learned.item_embedding(miss) + vector
        else:  # SICSRec: normalize(sum of the modalities' vectors)
            expected = F.normalize(vector, dim=-1).expand(len(miss), -1)
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, item_vectors(zero, miss))
        # PAD is never replaced: baselines keep the zero vector, TSSR/SICSRec their previous one
        pad = torch.tensor([0])
        torch.testing.assert_close(item_vectors(learned, pad), item_vectors(zero, pad), rtol=0, atol=0)
        if cls in (ContentSASRec, IDContentSASRec):
            assert float(item_vectors(learned, pad).abs().sum()) == 0.0


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_learned_vector_gets_gradient_only_from_missing_items(built, cls):
    model = make(built, cls, missing_modality="learned")
    vector = dict(missing_module(model).vectors.items())["text"]
    params = [vector] + [p for n, p in model.named_parameters() if "mlps" in n or "proj" in n]
    # items with content (and PAD): nothing reaches the missing vector
    ids = torch.cat([torch.tensor([0]), content_ids(built)])
    grads = torch.autograd.grad(item_vectors(model, ids).pow(2).sum(), params, allow_unused=True)
    assert grads[0] is None or float(grads[0].abs().sum()) == 0.0
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads[1:])
    # items without content: the vector gets a gradient, the projection / MLPs none
    grads = torch.autograd.grad(item_vectors(model, missing_ids(built)).pow(2).sum(), params, allow_unused=True)
    assert float(grads[0].abs().sum()) > 0
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads[1:])


def test_sicsrec_learned_keeps_missing_table_rows_untrained(built):
    """SICSRec's trainable stage-1 tables: with zero the zero rows of missing items train once the
    MLP's first bias has moved from its zero init (they start identical); with learned they get no
    gradient (the MLP output is replaced)."""
    miss = missing_ids(built)
    for mode, reaches in (("zero", True), ("learned", False)):
        model = make(built, SICSRec, missing_modality=mode)
        with torch.no_grad():
            model.content_mlps["text"][0].bias.normal_()  # as after some training (a zero row meets ReLU(b))
        table = model.content_tables["text"].weight
        assert table.requires_grad
        (grad,) = torch.autograd.grad(model.item_content(miss).sum() + model.item_content(miss).pow(3).sum(), [table])
        assert (float(grad[miss].abs().sum()) > 0) == reaches, mode


# ---------------------------------------------------------------- id


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_id_gives_each_missing_item_its_own_trained_vector(built, cls):
    zero = make(built, cls)
    model = make(built, cls, missing_modality="id")
    table = dict(missing_module(model).vectors.items())["text"]
    assert tuple(table.shape) == (len(MISSING_TOKENS), model.hidden_size)  # rows only for missing items
    for k, v in zero.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    miss, have = missing_ids(built), content_ids(built)
    with torch.no_grad():
        vec = item_vectors(model, miss)
        assert not torch.allclose(vec[0], vec[1]) and not torch.allclose(vec[2], vec[3])
        torch.testing.assert_close(item_vectors(model, have), item_vectors(zero, have), rtol=0, atol=0)
        if cls is ContentSASRec:
            torch.testing.assert_close(vec, table)  # row k = the k-th missing item in id order
        pad = torch.tensor([0])
        torch.testing.assert_close(item_vectors(model, pad), item_vectors(zero, pad), rtol=0, atol=0)
    # a gradient reaches only the rows of the missing items used
    (grad,) = torch.autograd.grad(item_vectors(model, miss[[1, 3]]).pow(2).sum(), [table])
    assert float(grad[[1, 3]].abs().sum()) > 0 and float(grad[[0, 2]].abs().sum()) == 0.0
    (grad,) = torch.autograd.grad(item_vectors(model, torch.cat([torch.tensor([0]), have])).pow(2).sum(), [table],
                                  allow_unused=True)
    assert grad is None or float(grad.abs().sum()) == 0.0


def test_both_modalities_replace_only_the_missing_one(built):
    """Two features: an item missing the image gets proj(text) + image vector, one missing both
    gets both vectors, one missing neither is unchanged."""
    torch.manual_seed(3)
    n, d = 7, 5
    text, image = torch.randn(n, 6), torch.randn(n, 4)
    miss_text = torch.tensor([True, False, True, False, True, False, False])  # PAD flag is dropped
    miss_image = torch.tensor([True, False, False, True, True, False, False])
    text[miss_text], image[miss_image] = 0.0, 0.0
    masks = {"text": miss_text.clone(), "image": miss_image.clone()}
    masks["text"][0] = masks["image"][0] = False
    zero = ContentProjector({"text": text, "image": image}, d)
    for mode in ("learned", "id"):
        proj = ContentProjector({"text": text, "image": image}, d, missing=masks, missing_modality=mode)
        proj.load_state_dict(zero.state_dict(), strict=False)
        proj.missing.reset_parameters(lambda w: w.normal_(0.0, 1.0))
        vt, vi = proj.missing.vectors["text"], proj.missing.vectors["image"]
        if mode == "id":  # rows in id order of each feature's missing items
            vt = torch.zeros(n, d).index_copy(0, torch.tensor([2, 4]), vt.detach())
            vi = torch.zeros(n, d).index_copy(0, torch.tensor([3, 4]), vi.detach())
        else:
            vt, vi = vt.detach().expand(n, d), vi.detach().expand(n, d)
        with torch.no_grad():
            ids = torch.arange(n)
            pt, pi = zero.proj["text"](text), zero.proj["image"](image)
            expected = torch.stack([
                pt[0] + pi[0],      # PAD: never replaced
                pt[1] + pi[1],      # both present: unchanged
                vt[2] + pi[2],      # text missing
                pt[3] + vi[3],      # image missing
                vt[4] + vi[4],      # both missing
                pt[5] + pi[5], pt[6] + pi[6]])
            torch.testing.assert_close(proj(ids), expected)
            torch.testing.assert_close(proj(ids)[[0, 1, 5, 6]], zero(ids)[[0, 1, 5, 6]], rtol=0, atol=0)


def test_both_modalities_in_a_model(built):
    """content_modality: both with an image feature whose mask differs from the text's."""
    dataset = built[1]
    n = dataset.item_num
    text_missing, have = missing_ids(built), content_ids(built)
    image_only, both, text_only = have[:2], text_missing[0], text_missing[1]
    miss_image = torch.zeros(n, dtype=torch.bool)
    miss_image[0] = True  # PAD, as the dataset flags it
    miss_image[image_only] = True
    miss_image[both] = True  # this item has neither text nor image
    torch.manual_seed(5)
    image = torch.randn(n, 8) * (~miss_image).unsqueeze(1)
    dataset.mm_features["image"], dataset.mm_missing["image"] = image, miss_image
    try:
        zero = make(built, ContentSASRec, content_modality="both")
        model = make(built, ContentSASRec, content_modality="both", missing_modality="learned")
        vt, vi = model.content.missing.vectors["text"], model.content.missing.vectors["image"]
        proj_text = model.content.proj["text"](dataset.mm_features["text"])
        proj_image = model.content.proj["image"](image)
        with torch.no_grad():
            torch.testing.assert_close(model.item_vectors(both.view(1)), (vt + vi).view(1, -1))
            torch.testing.assert_close(model.item_vectors(image_only), proj_text[image_only] + vi)
            torch.testing.assert_close(model.item_vectors(text_only.view(1)), (vt + proj_image[text_only]).view(1, -1))
            rest = torch.tensor([i for i in have.tolist() if i not in image_only.tolist()])
            torch.testing.assert_close(model.item_vectors(rest), zero.item_vectors(rest), rtol=0, atol=0)
            assert float(model.item_vectors(torch.tensor([0])).abs().sum()) == 0.0
    finally:
        del dataset.mm_features["image"], dataset.mm_missing["image"]


# ---------------------------------------------------------------- training, checkpoints


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", ["learned", "id"])
def test_new_parameters_are_trained_and_checkpoints_stay_lean(built, cls, mode):
    model = make(built, cls, missing_modality=mode)
    vectors = list(missing_module(model).vectors.parameters())
    assert vectors and all(p.requires_grad for p in vectors)
    # the optimizer gets them (the trainer uses optimizer_param_groups when a model has one)
    if hasattr(model, "optimizer_param_groups"):
        given = {id(p) for g in model.optimizer_param_groups() for p in g["params"]}
    else:
        given = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) in given for p in vectors)
    # one training step moves them (the batch's sequences hold missing items)
    model.train()
    before = [p.detach().clone() for p in vectors]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inter = next(iter(built[2]))
    assert bool(torch.isin(inter["item_id_list"], missing_ids(built)).any())
    losses = model.calculate_loss(inter)
    (sum(losses) if isinstance(losses, tuple) else losses).backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, vectors))
    # masks and row maps are non-persistent buffers: rebuilt from the dataset, not checkpointed
    state = model.state_dict()
    buffers = [n for n, _ in model.named_buffers() if "missing" in n]
    assert buffers and not [n for n in buffers if n in state]
    assert not [k for k in state if "tables" in k and k.endswith(".weight") and not model.get_parameter(k).requires_grad]
    fresh = make(built, cls, missing_modality=mode)
    fresh.load_state_dict(state)  # strict
    model.eval()
    with torch.no_grad():
        batch = first_batch(built)
        torch.testing.assert_close(fresh.full_sort_predict(batch), model.full_sort_predict(batch), rtol=0, atol=0)


def test_missing_buffers_keep_their_dtype(built):
    model = make(built, TSSR, missing_modality="id").to(torch.float64)
    assert model.content.missing.get_buffer("mask_text").dtype == torch.bool  # .to(dtype) leaves masks alone
    with torch.no_grad():
        assert model.full_sort_predict(first_batch(built)).dtype == torch.float64


def test_unknown_mode_is_refused(built):
    with pytest.raises(ValueError, match="missing_modality must be one of"):
        make(built, ContentSASRec, missing_modality="mean")
    with pytest.raises(ValueError, match="missing_modality must be one of"):
        make(built, SICSRec, missing_modality="learnt")
    with pytest.raises(ValueError, match="mode must be one of"):
        MissingContent({"text": torch.zeros(3, dtype=torch.bool)}, 4, "zero")


def test_an_image_less_target_is_reachable_only_with_id(built):
    """ContentSASRec has no IDs: with zero (or learned) every item without content scores the
    same, so among them the target is found by chance only; with id a few steps on sequences
    whose next items lack content rank each of those targets first."""
    dataset = built[1]
    miss = missing_ids(built)
    inter = next(iter(built[2]))
    seq, length = inter["item_id_list"], inter["item_length"]
    picks = []
    for target in miss.tolist():  # one training sequence per missing target
        rows = torch.nonzero(inter["item_id"] == target).flatten()
        if len(rows):
            picks.append(int(rows[0]))
    assert len(picks) >= 2, "the first batch should hold sequences whose next item has no text"
    batch = Interaction({"item_id_list": seq[picks], "item_length": length[picks], "item_id": inter["item_id"][picks]})
    targets = batch["item_id"]
    ranks = {}
    for mode in ("zero", "learned", "id"):
        model = make(built, ContentSASRec, missing_modality=mode)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            model.calculate_loss(batch).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            scores = model.full_sort_predict(batch)
        target_scores = scores.gather(1, targets.unsqueeze(1))
        ranks[mode] = (scores[:, 1:] >= target_scores).sum(1)  # 1 = strictly first (ties count against)
        if mode != "id":  # all missing items tie, whatever the training did
            assert torch.equal(scores[:, miss], scores[:, miss[:1]].expand(-1, len(miss)))
    assert (ranks["zero"] >= len(miss)).all() and (ranks["learned"] >= len(miss)).all()
    assert (ranks["id"] == 1).all(), ranks
    assert dataset.item_num == 31


def test_tssr_finetune_replaces_missing_text(built):
    """content_mode: finetune: the encoded (empty) text of an item without text is replaced too."""
    kw = dict(content_mode="finetune", encoder_max_length=8)
    zero = make(built, TSSR, **kw)
    model = make(built, TSSR, missing_modality="learned", **kw)
    vector = model.content.missing.vectors["text"]
    assert any(p is vector for p in model.optimizer_param_groups()[0]["params"])
    model.load_state_dict(zero.state_dict(), strict=False)  # same weights but the missing vector
    miss, have = missing_ids(built), content_ids(built)
    with torch.no_grad():
        torch.testing.assert_close(model.item_content(miss), vector.expand(len(miss), -1))
        torch.testing.assert_close(model.item_content(have), zero.item_content(have))


@pytest.mark.parametrize("cls", [TSSR, ContentSASRec, IDContentSASRec], ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", ["learned", "id"])
def test_missing_vectors_start_at_the_projected_contents_scale(built, cls, mode):
    """Drawn at an embedding's scale they stay near zero next to the projected content, and a
    content-only model ranks items without content in the middle of every list: they start at the
    root mean square of the projections of the items that have the feature (same directions)."""
    model = make(built, cls, missing_modality=mode)
    content = model.content
    name = content.names[0]
    with torch.no_grad():
        projected = content.proj[name](content.tables[name](content_ids(built)))
        vectors = content.missing.vectors[name]
        assert torch.allclose(vectors.pow(2).mean().sqrt(), projected.pow(2).mean().sqrt(), rtol=1e-4)
    # the other weights are those of a model whose vectors were not rescaled (no random numbers used)
    plain = make(built, cls, missing_modality="zero")
    for (n, a), (_, b) in zip(model.content.proj.named_parameters(), plain.content.proj.named_parameters()):
        assert torch.equal(a, b), n
