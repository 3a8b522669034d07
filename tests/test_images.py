"""Transparent images composited onto a background (default white) by the
one loader extraction and SICSRec stage 1 share; files in a format Pillow cannot read (SVG) are
reported as unsupported, apart from missing and corrupt files; frozen BatchNorm layers of a
partly frozen CNN keep their running statistics during stage-1 training."""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from recbole_mm.data import extract  # noqa: E402
from recbole_mm.data.images import open_image, parse_background, to_rgb  # noqa: E402

SVG = ('<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
       '<circle cx="16" cy="16" r="10" fill="red"/></svg>\n')


def _disc(mode="RGBA", size=32):
    """A red disc on a fully transparent square (RGBA), with one half-transparent pixel at (0, 0)."""
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((8, 8, size - 9, size - 9), fill=(255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 255, 128))
    return im if mode == "RGBA" else im.convert(mode)


def _save_disc(path):
    _disc().save(path)
    return str(path)


# ----------------------------------------------------------------------------- alpha


def test_transparent_png_is_composited_onto_white_not_black(tmp_path):
    path = _save_disc(tmp_path / "disc.png")
    with Image.open(path) as raw:
        raw.load()
        alpha = np.asarray(raw)[..., 3]
        assert (alpha == 0).any() and (alpha == 255).any()
        assert np.asarray(raw.convert("RGB"))[alpha == 0].max() == 0  # the old behaviour: black
    img, reason = open_image(path)
    assert reason is None and img.mode == "RGB"
    px = np.asarray(img)
    assert (px[alpha == 0] == 255).all()  # transparent -> white
    assert (px[alpha == 255] == [255, 0, 0]).all()  # opaque pixels unchanged
    assert tuple(px[0, 0]) == (127, 127, 255)  # half-transparent blue blended with white

    img, _ = open_image(path, (0, 128, 255))  # a configured background
    px = np.asarray(img)
    assert (px[alpha == 0] == [0, 128, 255]).all() and (px[alpha == 255] == [255, 0, 0]).all()


def test_palette_and_grey_alpha_images(tmp_path):
    # a palette image whose transparency is a palette index (GIF / PNG tRNS)
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, 1 red
    ImageDraw.Draw(pal).rectangle((4, 4, 11, 11), fill=1)
    pal.info["transparency"] = 0
    for ext in ("png", "gif"):
        path = str(tmp_path / f"pal.{ext}")
        pal.save(path, transparency=0)
        with Image.open(path) as check:
            assert check.mode == "P" and "transparency" in check.info
        img, reason = open_image(path)
        assert reason is None
        px = np.asarray(img)
        assert (px[:4] == 255).all() and (px[4:12, 4:12] == [255, 0, 0]).all(), ext

    la = _disc("LA")  # grey + alpha
    out = np.asarray(to_rgb(la, (10, 20, 30)))
    alpha = np.asarray(la)[..., 1]
    assert (out[alpha == 0] == [10, 20, 30]).all()
    grey = np.asarray(la)[..., 0][alpha == 255]
    assert (out[alpha == 255] == np.stack([grey] * 3, axis=1)).all()

    # no alpha: converted to RGB as before
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(rgb) is rgb
    assert np.asarray(to_rgb(Image.new("L", (4, 4), 7))).tolist() == np.full((4, 4, 3), 7).tolist()


def test_parse_background():
    assert parse_background(None) == (255, 255, 255)
    assert parse_background([0, 0, 0]) == (0, 0, 0)
    for bad in ([255, 255], [0, 0, 256], "white", [1.5, 0, 0], [True, 0, 0]):
        with pytest.raises(ValueError, match="image_background"):
            parse_background(bad)


# ----------------------------------------------------------------------------- unsupported formats


def test_svg_is_an_unsupported_format_not_a_missing_or_corrupt_file(tmp_path):
    svg = tmp_path / "a.svg"
    svg.write_text(SVG)
    img, reason = open_image(str(svg))
    assert img is None and reason.startswith("unsupported_format: SVG") and "PNG or JPEG" in reason
    misnamed = tmp_path / "b.png"  # SVG text under an image extension: still named as SVG
    misnamed.write_text(SVG)
    assert open_image(str(misnamed))[1].startswith("unsupported_format: SVG")
    broken = tmp_path / "c.jpg"
    broken.write_text("this is not an image")
    assert open_image(str(broken))[1].startswith("corrupt")
    assert open_image(str(tmp_path / "nope.png"))[1] == "missing_file"
    assert open_image(None)[1] == "missing_file"

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "only_svg.svg").write_text(SVG)
    (folder / "both.svg").write_text(SVG)
    _save_disc(folder / "both.png")
    found = extract.find_item_images(folder, ["only_svg", "both", "none"])
    assert [os.path.basename(p) if p else None for p in found] == ["only_svg.svg", "both.png", None]


def test_extraction_reports_unsupported_formats_and_composites_alpha(tmp_path, tiny_vit, caplog):
    d = tmp_path / "toy"
    img = d / "images"
    img.mkdir(parents=True)
    _save_disc(img / "1.png")  # transparent
    Image.alpha_composite(Image.new("RGBA", (32, 32), (255, 255, 255, 255)), _disc()).convert("RGB").save(
        img / "2.png")  # the same picture, already flattened on white
    Image.alpha_composite(Image.new("RGBA", (32, 32), (0, 0, 0, 255)), _disc()).convert("RGB").save(
        img / "3.png")  # ... and on black (what alpha dropping gave)
    (img / "4.svg").write_text(SVG)  # SVG only
    (img / "5.jpg").write_text("not a jpeg")  # corrupt; item 6 has no file
    (d / "toy.item").write_text("item_id:token\ttitle:token_seq\n" + "".join(f"{i}\titem {i}\n" for i in range(1, 7)))

    spec = {"type": "image", "encoder": tiny_vit, "batch_size": 4}
    with caplog.at_level(logging.WARNING, logger="recbole_mm"):
        fm = extract.extract_features(str(d), "toy", "image", spec, show_progress=False)
    man = fm.manifest
    assert man["problem_counts"] == {"missing_file": 1, "corrupt": 1, "unsupported_format": 1}
    assert man["problems"] == {"missing_file": ["6"], "corrupt": ["5"], "unsupported_format": ["4"]}
    assert man["image_background"] == [255, 255, 255]
    np.testing.assert_array_equal(fm.missing, [False, False, False, True, True, True])
    warning = [r.getMessage() for r in caplog.records if "4.svg" in r.getMessage()]
    assert warning and "unsupported_format" in warning[0] and "PNG or JPEG" in warning[0]
    assert "missing_file" not in warning[0] and "corrupt" not in warning[0]
    m = np.asarray(fm.matrix)
    np.testing.assert_allclose(m[0], m[1], atol=1e-5)  # transparent == flattened on white
    assert not np.allclose(m[0], m[2], atol=1e-3)  # ... not on black

    # another background is another feature: re-extracted, composited on it
    black = extract.extract_features(str(d), "toy", "image", dict(spec, image_background=[0, 0, 0]),
                                     show_progress=False)
    np.testing.assert_allclose(np.asarray(black.matrix)[0], m[2], atol=1e-5)
    with pytest.raises(ValueError, match="image_background"):
        extract.extract_features(str(d), "toy", "image", dict(spec, image_background="white"), show_progress=False)

    x, missing, problems = extract.encode_images([None, str(img / "4.svg")], tiny_vit, show_progress=False)
    assert problems == {"missing_file": [0], "corrupt": [], "unsupported_format": [1]} and missing.all()


# ----------------------------------------------------------------------------- SICSRec stage 1


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    folder = str(tmp_path_factory.mktemp("tiny_resnet"))
    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    return folder


def _bn_stats(model):
    return {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
            for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}


def test_stage1_frozen_batchnorm_keeps_its_running_statistics(tmp_path, tiny_resnet):
    from recbole_mm.model import sicsrec_stage1 as s1

    paths = [None]
    for i, colour in enumerate([(255, 0, 0), (0, 200, 30), (20, 40, 250)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), colour).save(p)
        paths.append(str(p))
    tower = s1.ImageTower(tiny_resnet, paths, trainable_layers=1)
    frozen = {n for n, p in tower.model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("embedder.") for n in frozen)  # the stem is frozen, as the lower stage
    assert any(n.startswith("encoder.stages.0.") for n in frozen)
    assert not any(n.startswith("encoder.stages.1.") for n in frozen)

    before = _bn_stats(tower.model)
    tower.train()
    feats, ok = tower(torch.tensor([1, 2, 3, 0]))
    assert ok.tolist() == [True, True, True, False]
    feats.sum().backward()
    after = _bn_stats(tower.model)
    for name, (mean, var, n) in before.items():
        is_frozen = f"{name}.weight" in frozen
        if is_frozen:
            assert torch.equal(mean, after[name][0]) and torch.equal(var, after[name][1]), name
            assert after[name][2] == n, name
        else:
            assert not torch.equal(mean, after[name][0]), name  # a trainable BN does update
    assert {n for n in before if f"{n}.weight" in frozen} >= {"embedder.embedder.normalization",
                                                               "encoder.stages.0.layers.0.layer.0.normalization"}
    # out_dim (a probe in eval mode, called e.g. for a batch without images) keeps the frozen parts in eval
    assert tower.out_dim == 16
    assert not tower.model.embedder.training and tower.model.encoder.stages[1].training
    tower.eval()
    assert not any(m.training for m in tower.model.modules())

    # k = 0: the whole model frozen, eval in train mode
    none = s1.ImageTower(tiny_resnet, paths, trainable_layers=0).train()
    assert not any(m.training for m in none.model.modules())


def test_stage1_images_are_composited_like_extraction(tmp_path, tiny_resnet):
    from recbole_mm.model import sicsrec_stage1 as s1

    path = _save_disc(tmp_path / "disc.png")
    img = s1._open_rgb(path)
    assert np.array_equal(np.asarray(img), np.asarray(open_image(path)[0]))
    assert (np.asarray(img)[np.asarray(_disc())[..., 3] == 0] == 255).all()
    tower = s1.ImageTower(tiny_resnet, [None, path], trainable_layers=0, background=[0, 0, 0])
    flat = tmp_path / "black.png"
    Image.alpha_composite(Image.new("RGBA", (32, 32), (0, 0, 0, 255)), _disc()).convert("RGB").save(flat)
    want = tower.processor(images=[Image.open(flat).convert("RGB")], return_tensors="pt")["pixel_values"]
    pixels, ok = tower._pixels([1])
    assert ok.tolist() == [True] and torch.allclose(pixels, want)
    svg = tmp_path / "x.svg"
    svg.write_text(SVG)
    assert s1._open_rgb(str(svg)) is None
