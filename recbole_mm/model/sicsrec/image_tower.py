"""SICSRec stage 1: the image tower that the alignment fine-tunes, and where each item's image is.

:class:`ImageTower` wraps any ``transformers`` vision model over internal item ids: its top ``k``
blocks train, everything before and below stays frozen (and in eval mode, so a frozen BatchNorm's
statistics never move); images are read by the plugin's one image loader
(:mod:`recbole_mm.data.images`), an unreadable file makes the item image-less. The text tower is
:class:`recbole_mm.encoders.text.FinetuneTextEncoder`.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from recbole_mm.features.chunks import sha256_strings

logger = logging.getLogger(__name__)

IMAGE_POOLINGS = ("pooler", "cls", "mean", "logits")


def _block_list(model):
    """The main stack of repeated blocks (the ``nn.ModuleList`` holding most parameters): (its name, it)."""
    from recbole_mm.encoders.image import largest_module_list

    blocks = largest_module_list(model)
    if blocks is None:
        return None, None
    return next(name for name, m in model.named_modules() if m is blocks), blocks


def _open_rgb(path, background=None):
    """The item image as RGB (transparency composited onto ``background``, default white), or None."""
    from recbole_mm.data.images import open_image, parse_background

    if path is None or not os.path.isfile(path):
        return None
    img, reason = open_image(path, parse_background(background))
    if img is None:  # corrupt / unsupported format: the item has no image
        logger.warning("SICSRec stage 1: cannot read image %s (%s); the item is treated as image-less", path, reason)
    return img


def frozen_modules(model):
    """The largest submodules of ``model`` (``model`` itself included) that have parameters and
    none requiring grad: the frozen parts, whose BatchNorm statistics (and dropout) must not
    change while the rest trains."""
    out, inside = [], []  # named_modules is pre-order: a frozen module's descendants follow it
    for name, module in model.named_modules():
        if inside and name.startswith(inside[-1]):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(module)
            if not name:
                break  # the whole model is frozen
            inside.append(f"{name}.")
    return out


def keep_frozen_in_eval(model):
    """Put the frozen parts of ``model`` (see :func:`frozen_modules`) in eval mode, so a training
    forward leaves their BatchNorm running mean / var untouched; returns them."""
    parts = frozen_modules(model)
    for module in parts:
        module.eval()
    return parts


class ImageTower(nn.Module):
    """A ``transformers`` vision model with its top ``k`` blocks trainable, per item id.

    ``paths[i]`` is item ``i``'s image file (None: no image); transparent images are composited
    onto ``background`` ([R, G, B], default white). ``pooling``: ``pooler``
    (``pooler_output`` when the model has one, else CLS / spatial mean), ``cls``, ``mean`` or
    ``logits`` (an image-classification model's class logits, as the official Swin export).
    Everything before the block stack (embeddings, a CNN's stem) and the lower blocks are frozen;
    with ``k > 0`` the top ``k`` blocks and every parameter after the block stack (final norm,
    pooler, classifier) train. Frozen parts stay in eval mode when the tower is put in train mode
    (a frozen BatchNorm's running statistics never move).
    """

    def __init__(self, name_or_path, paths, trainable_layers=1, pooling="pooler", cache_items=4096,
                 background=None):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

        from recbole_mm.data.images import parse_background

        if pooling not in IMAGE_POOLINGS:
            raise ValueError(f"sft_image_pooling must be one of {IMAGE_POOLINGS}, got {pooling!r}")
        path = os.fspath(name_or_path)
        try:
            self.processor = AutoImageProcessor.from_pretrained(path)
            loader = AutoModelForImageClassification if pooling == "logits" else AutoModel
            model = loader.from_pretrained(path)
        except OSError as e:
            raise OSError(f"cannot load image encoder {path!r}: {e}") from e
        if pooling != "logits" and hasattr(model, "vision_model") and hasattr(model.config, "vision_config"):
            model = model.vision_model  # CLIP-like composite
        self.model = model
        self.pooling = pooling
        self.paths = list(paths)
        self.background = parse_background(background, "image_background")
        self.valid = torch.tensor([p is not None for p in self.paths], dtype=torch.bool)
        self.cache_items = int(cache_items)
        self._cache = {}
        name, blocks = _block_list(model)
        n_blocks = len(blocks) if blocks is not None else 0
        if trainable_layers < 0 or trainable_layers > max(n_blocks, 0) and blocks is not None:
            raise ValueError(f"sft_image_trainable_layers must be in [0, {n_blocks}], got {trainable_layers}")
        for p in model.parameters():
            p.requires_grad = False
        if trainable_layers > 0:
            block_params = {id(p) for p in blocks.parameters()} if blocks is not None else set()
            seen_blocks = False  # parameters registered before the block stack (embeddings, stem) stay frozen
            for pname, p in model.named_parameters():
                if id(p) in block_params:
                    seen_blocks = True
                elif seen_blocks and "embeddings" not in pname:
                    p.requires_grad = True
            if blocks is not None:
                for block in list(blocks)[n_blocks - trainable_layers:]:
                    for p in block.parameters():
                        p.requires_grad = True
            else:
                for p in model.parameters():
                    p.requires_grad = True
        self.trainable_layers = trainable_layers
        self.block_path = name

    @property
    def out_dim(self):
        with torch.no_grad():
            modes = [(m, m.training) for m in self.model.modules()]  # restored as they were (frozen parts in eval)
            self.model.eval()
            from PIL import Image

            dim = self._encode_images([Image.new("RGB", (32, 32), (127, 127, 127))]).shape[1]
            for m, was in modes:
                m.training = was
        return int(dim)

    def train(self, mode=True):
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self.model)
        return self

    def _pixels(self, rows):
        device = next(self.model.parameters()).device
        out, ok = [], []
        for r in rows:
            r = int(r)
            if r in self._cache:
                px = self._cache[r]
            else:
                img = _open_rgb(self.paths[r], self.background) if self.valid[r] else None
                if img is None:
                    self.valid[r] = False
                    px = None
                else:
                    px = self.processor(images=[img], return_tensors="pt")["pixel_values"][0]
                    if len(self._cache) < self.cache_items:
                        self._cache[r] = px
            ok.append(px is not None)
            if px is not None:
                out.append(px)
        pixels = torch.stack(out).to(device) if out else None
        return pixels, torch.tensor(ok, dtype=torch.bool)

    def _pool(self, output):
        if self.pooling == "logits":
            return output.logits.float()
        mode = self.pooling
        pooled = getattr(output, "pooler_output", None)
        if mode == "pooler" and pooled is not None:
            return pooled.float().flatten(1)
        hidden = output.last_hidden_state.float()
        if hidden.dim() == 4:  # feature maps
            return hidden.mean(dim=(2, 3))
        return hidden[:, 0] if mode in ("cls", "pooler") else hidden.mean(dim=1)

    def _encode_images(self, images):
        device = next(self.model.parameters()).device
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        return self._pool(self.model(pixel_values=pixels))

    def forward(self, item_ids):
        """``item_ids`` (N,) -> (vectors (N, dim), ok (N,) bool); items without image get zeros."""
        flat = item_ids.reshape(-1).cpu()
        uniq, inverse = torch.unique(flat, return_inverse=True)
        pixels, ok = self._pixels(uniq.tolist())
        if pixels is None:
            dim = self.out_dim
            device = next(self.model.parameters()).device
            return torch.zeros(len(flat), dim, device=device), torch.zeros(len(flat), dtype=torch.bool)
        feats = self._pool(self.model(pixel_values=pixels))
        full = feats.new_zeros(len(uniq), feats.shape[1])
        full[ok.to(feats.device)] = feats
        return full[inverse.to(feats.device)], ok[inverse]


class EncoderImageTower(nn.Module):
    """Stage 1's image tower on :class:`recbole_mm.encoders.image.FinetuneImageEncoder` (any encoder
    it loads: ``transformers`` vision models and ``{type: module, ...}`` networks such as
    EfficientNet with real ImageNet weights), with its economies: each distinct item once, pixels
    decoded once (uint8 cache) and the frozen lower blocks run once per item (cached), so a step runs
    the top ``k`` blocks only. ``forward`` gives ``(vectors, ok)`` as :class:`ImageTower` does."""

    def __init__(self, encoder, paths, trainable_layers=1, pooling="pooler", background=None, cache_mb=2048,
                 cache_dtype="float32", pixel_cache_mb=2048, lora=None):
        super().__init__()
        from recbole_mm.data.images import parse_background
        from recbole_mm.encoders.image import load_image_finetune

        if pooling not in IMAGE_POOLINGS[:3]:
            raise ValueError(f"sft_image_pooling must be one of {IMAGE_POOLINGS[:3]} here, got {pooling!r}")
        self.encoder = load_image_finetune(
            encoder, paths, torch.tensor([p is not None for p in paths], dtype=torch.bool),
            background=parse_background(background, "image_background"), pooling=pooling,
            trainable_layers=trainable_layers, cache_mb=cache_mb, cache_dtype=cache_dtype,
            pixel_cache_mb=pixel_cache_mb, lora=lora)
        self.out_dim = self.encoder.out_dim

    @property
    def valid(self):
        return self.encoder.available.cpu()

    @property
    def model(self):
        """The network (as :attr:`ImageTower.model`)."""
        return self.encoder.encoder

    def forward(self, item_ids):
        """``item_ids`` (N,) -> (vectors (N, dim), ok (N,) bool); items without image get zeros."""
        flat = item_ids.reshape(-1)
        vec = self.encoder(flat.to(self.encoder.available.device))
        return vec, self.encoder.available[flat.to(self.encoder.available.device)].cpu()


def make_image_tower(encoder, paths, trainable_layers, pooling, background=None, cache_mb=2048,
                     cache_dtype="float32", lora=None):
    """:class:`EncoderImageTower` (cached, any encoder) for every pooling but ``logits`` (an image
    classifier's class scores, the official Swin export), which keeps :class:`ImageTower`."""
    from recbole_mm.data.image_encoders import parse_image_encoder

    if pooling == "logits":
        if parse_image_encoder(encoder, "sft_image_encoder")["type"] != "transformers":
            raise ValueError("sft_image_pooling: logits needs a transformers image-classification model")
        if lora is not None:
            raise ValueError("sft_peft: lora is not available with sft_image_pooling: logits (use pooler, cls or mean)")
        return ImageTower(encoder, paths, trainable_layers, pooling, background=background)
    return EncoderImageTower(encoder, paths, trainable_layers, pooling, background=background, cache_mb=cache_mb,
                             cache_dtype=cache_dtype, lora=lora)


def _image_paths(dataset, feature):
    """Per internal item id, the image file of the item (None: no image), resolved as feature
    extraction resolves it (:meth:`MultiModalSequentialDataset.image_paths`)."""
    return dataset.image_paths(feature)


def _file_sig(paths):
    parts = []
    for p in paths:
        if p is None:
            parts.append("")
        else:
            st = os.stat(p)
            parts.append(f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns}")
    return sha256_strings(parts)
