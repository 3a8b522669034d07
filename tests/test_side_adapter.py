"""The side adapter on cached hidden states (recbole_mm.encoders.side, ``encoder_peft: side``): it
starts equal to the frozen encoder, runs the backbone once per item, trains its own network only
(the backbone's weights never move), gives image-less items zeros, and TSSR trains with it."""

import pytest
import torch

from recbole_mm.encoders.image import FinetuneImageEncoder, PixelSource, load_image_finetune
from recbole_mm.encoders.side import SideAdapterEncoder
from recbole_mm.encoders.text import FinetuneTextEncoder
from test_image_finetune import (NO_IMAGE, _available, _build, _efficientnet_spec, _frozen_features,  # noqa: F401
                                 _image_dataset, image_paths, tiny_vit, train_steps)


def _counting(base):
    calls = []
    taps = base.taps

    def counted(rows):
        calls.extend(rows.tolist())
        return taps(rows)

    base.taps = counted
    return calls


def _train_steps(side, rows, steps=3):
    opt = torch.optim.Adam([p for p in side.parameters() if p.requires_grad], lr=1e-2)
    side.train()
    for _ in range(steps):
        opt.zero_grad()
        (side(rows) - 1.0).pow(2).mean().backward()
        opt.step()


def test_image_side_adapter_starts_at_the_frozen_encoder_and_trains_its_own_network(tiny_vit, image_paths):
    base = load_image_finetune(tiny_vit, image_paths, _available(image_paths), trainable_layers=0,
                               cache_pixels=False, cache_lower=False)
    side = SideAdapterEncoder(base, bottleneck=8)
    assert len(side.dims) == 1 + 3 and side.out_dim == side.dims[-1]  # stem, blocks 1-2, the output
    rows = torch.tensor([[1, 2, 4, 1], [2, 3, 0, 0]])  # item 3 has no image, 0 is padding
    side.eval()
    with torch.no_grad():
        out = side(rows)
    ref = _frozen_features(tiny_vit, image_paths)
    torch.testing.assert_close(out[0, :3], ref[[1, 2, 4]], rtol=1e-4, atol=1e-4)
    assert not out[1, 1].any() and not out[1, 2].any()  # no image / padding: zeros
    calls = _counting(base)
    frozen = {k: v.clone() for k, v in base.encoder.state_dict().items()}
    _train_steps(side, rows)
    assert calls == []  # every item's taps were cached by the first pass: the backbone never ran again
    after = base.encoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert not any(p.requires_grad for p in base.parameters()) and side.encoder_parameters() == []
    side.eval()
    with torch.no_grad():
        moved = side(rows)
    assert not torch.allclose(moved[0, :3], out[0, :3]) and not moved[1, 1].any()


def test_side_adapter_on_an_efficientnet_reads_blocks_of_every_width(image_paths):
    spec = _efficientnet_spec()
    base = load_image_finetune(spec, image_paths, _available(image_paths), trainable_layers=0, cache_pixels=False,
                               cache_lower=False)
    side = SideAdapterEncoder(base, bottleneck=4)
    assert len(set(side.dims)) > 2 and len(side.dims) == len(base.blocks) + 1
    side.eval()
    with torch.no_grad():
        torch.testing.assert_close(side(torch.tensor([1, 2])), _frozen_features(spec, image_paths[1:3]),
                                   rtol=1e-4, atol=1e-4)


def test_text_side_adapter_starts_at_the_frozen_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32))
    ids = torch.randint(1, 50, (6, 7))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    frozen = FinetuneTextEncoder(bert, ids, mask, trainable_layers=0, pooling="mean", cache_lower=False).eval()
    base = FinetuneTextEncoder(bert, ids, mask, trainable_layers=0, pooling="mean", cache_lower=False)
    side = SideAdapterEncoder(base, bottleneck=4, cache_dtype="float16")
    assert side.dims == [16, 16, 16]  # embeddings, layer 1, the output
    rows = torch.tensor([1, 2, 5])
    side.eval()
    with torch.no_grad():
        torch.testing.assert_close(side(rows), frozen(rows))
        # again, from the caches: the inner taps in float16, the frozen output kept exact
        assert side.cache.used == 3 and side.cache.store.dtype == torch.float16
        torch.testing.assert_close(side(rows), frozen(rows))
        full = bert(input_ids=ids[rows], attention_mask=mask[rows], output_hidden_states=True).hidden_states
    taps = base.taps(rows)
    m = mask[rows].unsqueeze(-1).float()
    torch.testing.assert_close(taps[:, 16:32], (full[1] * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-5)
    # the inner taps are masked means even under cls pooling (an embedding's first token is the same
    # for every item); the output follows the pooling
    cls = FinetuneTextEncoder(bert, ids, mask, trainable_layers=0, pooling="cls", cache_lower=False).taps(rows)
    torch.testing.assert_close(cls[:, :32], taps[:, :32])
    torch.testing.assert_close(cls[:, 32:], full[-1][:, 0], rtol=1e-5, atol=1e-5)
    _train_steps(side, rows)
    assert all(not p.requires_grad for p in bert.parameters())
    side.eval()
    with torch.no_grad():
        assert not torch.allclose(side(rows), frozen(rows))


def test_what_a_side_adapter_cannot_take_is_said(image_paths):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.ReLU())
    px = PixelSource(image_paths, lambda ims: torch.zeros(len(ims), 3, 16, 16, dtype=torch.uint8), (0.5,) * 3,
                     (0.5,) * 3)
    whole = FinetuneImageEncoder(net, px, _available(image_paths), forward_fn=lambda x, pool: net(x).mean((2, 3)),
                                 trainable_layers=0)
    with pytest.raises(ValueError, match="encoder_peft: side needs the image network's stem / blocks / head"):
        SideAdapterEncoder(whole)
    with pytest.raises(ValueError, match="side_bottleneck must be >= 1"):
        SideAdapterEncoder(whole, bottleneck=0)


def test_tssr_trains_with_side_adapters_on_both_encoders(tmp_path, tiny_vit):
    from recbole_mm.model.tssr import TSSR

    specs = _image_dataset(tmp_path, tiny_vit)
    config, dataset, train = _build(tmp_path, specs, content_modality="both", encoder_peft="side", side_bottleneck=8,
                                    encoder_max_length=8, missing_modality="learned")
    torch.manual_seed(0)
    model = TSSR(config, dataset)
    encoders = model.content.encoders
    assert all(isinstance(e, SideAdapterEncoder) for e in encoders.values())
    assert all(not e.out.weight.any() for e in encoders.values())  # TSSR's init left the zero output layer alone
    groups = model.optimizer_param_groups()
    assert len(groups) == 1  # the side networks train at the model's learning rate; no backbone weight trains
    backbones = {n: {k: v.clone() for k, v in e.encoder.state_dict().items()} for n, e in encoders.items()}
    inter = train_steps(model, groups, train)
    for n, e in encoders.items():
        after = e.encoder.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in backbones[n].items()), n
        assert e.out.weight.abs().sum() > 0, n  # the side network learned
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(inter)
    assert scores.shape == (inter["item_id"].shape[0], dataset.item_num) and torch.isfinite(scores).all()


def test_every_side_parameter_gets_a_gradient_even_with_two_taps():
    """A one-layer encoder has two taps (embeddings, output): no gate then, so no parameter is left
    without a gradient (DDP's reduction needs each one used)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    for layers in (1, 3):
        bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                    intermediate_size=32))
        ids = torch.randint(1, 50, (5, 6))
        side = SideAdapterEncoder(FinetuneTextEncoder(bert, ids, torch.ones_like(ids), trainable_layers=0,
                                                      cache_lower=False), bottleneck=4)
        with torch.no_grad():
            side.out.weight.normal_()  # past the zero start, so gradients reach the side stream
        side.train()
        side(torch.tensor([1, 2, 3])).pow(2).sum().backward()
        trainable = [(n, p) for n, p in side.named_parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable), \
            [n for n, p in trainable if p.grad is None or not p.grad.abs().sum()]


def test_the_side_network_is_smaller_than_the_top_block_it_replaces(image_paths):
    spec = _efficientnet_spec()
    top = load_image_finetune(spec, image_paths, _available(image_paths), trainable_layers=1, cache_pixels=False)
    base = load_image_finetune(spec, image_paths, _available(image_paths), trainable_layers=0, cache_pixels=False,
                               cache_lower=False)
    side = SideAdapterEncoder(base, bottleneck=64)
    n_side = sum(p.numel() for p in side.parameters() if p.requires_grad)
    r, dims = 64, side.dims
    assert n_side == sum(k * r + r for k in dims[:-1]) + (len(dims) - 2) * (2 * r + 2 * (r * r + r)) \
        + len(dims) - 2 + r * dims[-1] + dims[-1]
    assert n_side < sum(p.numel() for p in top.encoder_parameters())


def test_a_text_encoder_without_a_known_layer_list_gives_its_hidden_states():
    """An encoder whose layers the split does not know (here a BERT with its layer list renamed) still
    gets taps from its hidden_states, as many as it has."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32))
    ids = torch.randint(1, 50, (5, 6))
    base = FinetuneTextEncoder(bert, ids, torch.ones_like(ids), trainable_layers=0, cache_lower=False)
    base.split_ok = False  # as for an encoder without embeddings + a layer list
    side = SideAdapterEncoder(base, bottleneck=4)
    assert side.dims == [16, 16, 16]  # embeddings, layer 1, the output (as with the layer list)
    side.eval()
    with torch.no_grad():
        ref = bert(input_ids=ids[[1, 3]], attention_mask=torch.ones(2, 6, dtype=torch.long)).last_hidden_state.mean(1)
        torch.testing.assert_close(side(torch.tensor([1, 3])), ref, rtol=1e-5, atol=1e-5)
