"""End-to-end image encoders for ``content_mode: finetune`` (TSSR with ``content_modality: image``
or ``both``).

An image encoder sits in the graph with its top ``k`` blocks trainable (or LoRA adapters on them,
:mod:`recbole_mm.encoders.lora`). Three economies, each a switch, make a step cost the trainable
blocks of the batch's distinct items only:

* **each distinct item of a batch once** (``unique_items``), not every one of the B x L positions;
* **pixels decoded and preprocessed once per item** and kept compactly as uint8 (3 x S x S bytes per
  item, :class:`~recbole_mm.encoders.cache.BoundedRowCache` within ``pixel_cache_mb``), normalised
  on the fly;
* **the frozen lower part run once per item** (stem + the blocks below the top ``k``, in eval mode,
  under ``no_grad``) and its output cached within ``cache_mb``.

Turning all three off gives the original TSSR regime: every position's image decoded and pushed
through the whole network every step.

How the network splits into stem / blocks / head is known for three families (:func:`find_split`):
``transformers`` ViT-like models (``embeddings`` + a layer list + ``layernorm`` [+ ``pooler``]: ViT,
DeiT, DINOv2 ...), ``transformers`` ResNet-like models (``embedder`` + ``encoder.stages`` +
``pooler``: ResNet, RegNet) and EfficientNet modules in the lukemelas layout (``_conv_stem`` /
``_blocks`` / ``_conv_head``: ``efficientnet_pytorch``, ``efficientnet_lite_pytorch``). A test checks
for each that stem + blocks + head equals the model's own frozen features. Any other model still
fine-tunes, as a whole forward per step with the top ``k`` of its largest block list trainable (no
lower cache; a log line says so).

Frozen parts are really frozen: their BatchNorm layers stay in eval mode in training (running
statistics unchanged), and their dropout off, so the cache stays valid.
"""

import contextlib
import logging

import torch
import torch.nn as nn

from .cache import BoundedRowCache, encode_items, zeros_in_graph
from .text import _layer_output

logger = logging.getLogger(__name__)

POOLINGS = ("pooler", "cls", "mean")


# ============================================================================ pixels
class PixelSource:
    """Item images as uint8 pixels (3, S, S) preprocessed for one encoder, and their normalisation.

    ``paths``: per internal item id, the image file or None. ``to_uint8(PIL images)`` resizes and crops
    as the encoder expects; ``normalise`` maps 0..255 values to the encoder's input. Images that
    fail to open give zero pixels (marked in ``bad``; their items are normally already
    marked missing by the image feature's extraction).
    """

    def __init__(self, paths, to_uint8, mean, std, scale=1.0 / 255, background=(255, 255, 255), size=None):
        self.paths = list(paths)
        self.to_uint8 = to_uint8
        self.mean = torch.tensor([float(x) for x in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(x) for x in std]).view(1, 3, 1, 1)
        self.scale = float(scale)
        self.background = tuple(background)
        self.bad = torch.zeros(len(self.paths), dtype=torch.bool)  # files found unreadable when loading
        self.size = size if size is not None else self._probe_size()

    def _probe_size(self):
        from PIL import Image

        return tuple(self.to_uint8([Image.new("RGB", (64, 48), self.background)]).shape[1:])

    def load(self, rows):
        """(len(rows), 3, S, S) float32 holding 0..255 integers; zeros for items without an image."""
        from recbole_mm.data.images import open_image

        rows = rows.tolist() if torch.is_tensor(rows) else list(rows)
        out = torch.zeros((len(rows),) + tuple(self.size), dtype=torch.float32)
        images, where = [], []
        for i, r in enumerate(rows):
            path = self.paths[r] if 0 <= r < len(self.paths) else None
            if path is None:
                continue
            img, reason = open_image(path, self.background)
            if img is None:
                self.bad[r] = True
                logger.warning("image of item %d (%s): %s; its pixels are zeros", r, path, reason)
                continue
            images.append(img)
            where.append(i)
        if images:
            out[where] = self.to_uint8(images).float()
        return out

    def normalise(self, pixels):
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return (pixels * self.scale - mean) / std


def processor_pixels(processor, paths, background):
    """A :class:`PixelSource` for a ``transformers`` image processor: its own resize / crop, with
    rescaling and normalisation applied on the fly."""
    def to_uint8(images):
        out = processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out).float().round().clamp(0, 255).to(torch.uint8)

    normalize = getattr(processor, "do_normalize", True)
    rescale = getattr(processor, "do_rescale", True)
    mean = processor.image_mean if normalize else (0.0, 0.0, 0.0)
    std = processor.image_std if normalize else (1.0, 1.0, 1.0)
    scale = getattr(processor, "rescale_factor", 1.0 / 255) if rescale else 1.0
    return PixelSource(paths, to_uint8, mean, std, scale=scale, background=background)


def module_pixels(spec, paths, background):
    """A :class:`PixelSource` for an image encoder of ``type: module`` (its resize / crop / mean / std)."""
    from recbole_mm.data.image_encoders import resize_crop_uint8

    return PixelSource(paths, lambda images: resize_crop_uint8(images, spec["image_size"], spec["resize"]),
                       spec["mean"], spec["std"], background=background)


# ============================================================================ splits
class Split:
    """How one network runs as stem -> blocks -> head. ``head_modules``: modules after the blocks
    with parameters (trainable with the top blocks under full tuning)."""

    kind = "generic"

    def __init__(self, model):
        self.model = model

    blocks = None
    head_modules = ()

    def stem(self, x):
        raise NotImplementedError

    def block(self, i, h):
        return _layer_output(self.blocks[i](h))

    def head(self, h, pooling):
        raise NotImplementedError


def _find_list(model, paths):
    for path in paths:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    return None


class ViTSplit(Split):
    kind = "vit"

    def __init__(self, model, blocks):
        super().__init__(model)
        self.blocks = blocks
        self.norm = getattr(model, "layernorm", None) or getattr(model, "post_layernorm", None)
        self.pooler = getattr(model, "pooler", None)
        self.head_modules = tuple(m for m in (self.norm, self.pooler) if m is not None)

    def stem(self, x):
        return self.model.embeddings(x)

    def head(self, h, pooling):
        seq = self.norm(h) if self.norm is not None else h
        if pooling == "pooler" and self.pooler is not None:
            return self.pooler(seq).flatten(1)
        if pooling == "mean":
            return seq.mean(1)
        return seq[:, 0]


class ResNetSplit(Split):
    kind = "resnet"

    def __init__(self, model):
        super().__init__(model)
        self.blocks = model.encoder.stages
        self.pooler = getattr(model, "pooler", None)

    def stem(self, x):
        return self.model.embedder(x)

    def head(self, h, pooling):
        if pooling == "cls":
            raise ValueError("image encoder: a ResNet-like model outputs feature maps without a CLS token; use "
                             "pooling pooler or mean (as feature extraction requires)")
        return h.mean(dim=(2, 3))  # the pooler's global average pool (identical, without reshaping)


class EfficientNetSplit(Split):
    """lukemelas-layout EfficientNets (``efficientnet_pytorch`` / ``efficientnet_lite_pytorch``),
    as their ``extract_features`` runs them, pooled by the spatial mean."""

    kind = "efficientnet"

    def __init__(self, model):
        super().__init__(model)
        self.blocks = model._blocks
        self.head_modules = (model._conv_head, model._bn1)

    def stem(self, x):
        m = self.model
        return m._swish(m._bn0(m._conv_stem(x)))

    def block(self, i, h):
        rate = self.model._global_params.drop_connect_rate
        if rate:
            rate *= float(i) / len(self.blocks)
        return self.blocks[i](h, drop_connect_rate=rate)

    def head(self, h, pooling):
        m = self.model
        return m._swish(m._bn1(m._conv_head(h))).mean(dim=(2, 3))


VIT_LAYER_PATHS = ("encoder.layer", "encoder.layers", "layers", "layer")


def find_split(model, method="forward"):
    """The :class:`Split` of ``model``, or None when its structure is not one of the known families."""
    if all(hasattr(model, a) for a in ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_swish")):
        return EfficientNetSplit(model) if method == "extract_features" else None
    if hasattr(model, "embedder") and hasattr(getattr(model, "encoder", None), "stages"):
        return ResNetSplit(model)
    if hasattr(model, "embeddings") and not hasattr(model, "pre_layrnorm"):
        blocks = _find_list(model, VIT_LAYER_PATHS)
        if blocks is not None and (hasattr(model, "layernorm") or hasattr(model, "post_layernorm")):
            return ViTSplit(model, blocks)
    return None


def largest_module_list(model):
    """The main stack of repeated blocks: the ``nn.ModuleList`` holding most parameters (the
    outermost on a tie), or None."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            key = (sum(p.numel() for p in module.parameters()), -len(name))
            if best is None or key > best[0]:
                best = (key, module)
    return best[1] if best else None


# ============================================================================ the encoder
class FinetuneImageEncoder(nn.Module):
    """Item image -> vector with a partly trainable image network.

    Args:
        model: the network (a ``transformers`` vision model or a ``torch.nn.Module``).
        pixels: a :class:`PixelSource` for its input.
        available: bool (n_items,) -- items with a readable image; the others get a zero vector
            (a model's ``missing_modality`` then decides what stands in for it) and cost nothing.
        forward_fn: ``(normalised pixels, pooling) -> (B, D)``: the whole network, used when the
            structure has no known :class:`Split`.
        trainable_layers: top blocks that train (0: frozen network, the head included).
        lora: None, or a dict for :func:`recbole_mm.encoders.lora.apply_lora` (the top blocks get
            adapters; every weight of the network stays frozen).
        unique_items / cache_pixels / cache_lower: the three economies of the module docstring.
        chunk_items: images decoded and run through the frozen part at a time (bounds the memory
            of a batch that brings many new items).
    """

    def __init__(self, model, pixels, available, forward_fn=None, method="forward", trainable_layers=1,
                 pooling="pooler", unique_items=True, cache_pixels=True, pixel_cache_mb=2048, cache_lower=True,
                 cache_mb=2048, cache_dtype="float32", lora=None, chunk_items=64):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"image encoder pooling must be one of {POOLINGS}, got {pooling!r}")
        if cache_dtype not in ("float32", "float16"):
            raise ValueError(f"encoder cache dtype must be float32 or float16, got {cache_dtype!r}")
        self.encoder = model
        self.pixels = pixels
        self.pooling = pooling
        self.forward_fn = forward_fn
        self.unique_items = bool(unique_items)
        self.chunk_items = max(1, int(chunk_items))
        has_path = torch.tensor([p is not None for p in pixels.paths], dtype=torch.bool)
        available = torch.as_tensor(available, dtype=torch.bool).clone() & has_path  # a file gone since extraction
        self.register_buffer("available", available, persistent=False)
        self.split = self._checked_split(find_split(model, method), forward_fn)
        blocks = self.split.blocks if self.split is not None else largest_module_list(model)
        n_blocks = len(blocks) if blocks is not None else 0
        if trainable_layers < 0 or trainable_layers > max(n_blocks, 1 if blocks is None else 0):
            raise ValueError(f"image encoder: trainable layers must be in [0, {n_blocks}] (its blocks), "
                             f"got {trainable_layers}")
        if self.split is None and forward_fn is None:
            raise ValueError("image encoder: its structure is not a known family (ViT-like, ResNet-like, "
                             "EfficientNet) and no forward function was given")
        self.n_blocks, self.trainable_layers = n_blocks, int(trainable_layers)
        object.__setattr__(self, "blocks", blocks)  # a view into the model: not registered twice (state_dict)
        for p in model.parameters():
            p.requires_grad = False
        top = list(blocks)[n_blocks - self.trainable_layers:] if blocks is not None else []
        self.trainable_modules = list(top)
        if blocks is None and trainable_layers > 0:
            logger.warning("image encoder: no block list found; the whole network trains")
            self.trainable_modules = [model]
        if self.trainable_layers > 0 and self.split is not None and lora is None:
            # the head after the blocks trains with them; a pooler only when the pooling reads it (a
            # parameter without gradient breaks DDP's reduction)
            self.trainable_modules += [m for m in self.split.head_modules
                                       if m is not getattr(self.split, "pooler", None) or pooling == "pooler"]
        if lora is not None:
            from .lora import apply_lora

            if not top:
                raise ValueError("image encoder: LoRA needs trainable layers >= 1 (the blocks that get adapters)")
            self.lora_names = apply_lora(model, top, **lora)
            self.trainable_modules = list(top)
            self.lora = True
        else:
            self.lora = False
            for m in self.trainable_modules:
                for p in m.parameters():
                    p.requires_grad = True
        self.cache_lower = bool(cache_lower and self.split is not None)
        if self.split is None:
            logger.info("image encoder: no known stem/blocks/head split for %s; the whole network runs every "
                        "step (no lower-part cache)", type(model).__name__)
        self.pixel_cache = BoundedRowCache(len(pixels.paths), pixels.size, budget_mb=pixel_cache_mb,
                                           dtype=torch.uint8, name="image pixel cache") if cache_pixels else None
        self.lower_cache = None
        self.out_dim = self._probe_dim(cache_mb, cache_dtype)

    # ------------------------------------------------------------------ set-up
    def _checked_split(self, split, forward_fn):
        """``split`` when stem + blocks + head reproduce the whole network (``forward_fn``) on a
        random image in eval mode, else None (the network then runs whole): a model that looks like
        a known family but computes differently (a norm before or after the blocks that the split
        does not know, stages that take extra arguments) must not give silently different features."""
        if split is None or forward_fn is None:
            return split
        model = split.model
        was = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                x = torch.randn((2,) + tuple(self.pixels.size), generator=torch.Generator().manual_seed(0))
                x = x.to(next(model.parameters()).device)
                h = split.stem(x)
                for i in range(len(split.blocks)):
                    h = split.block(i, h)
                ours, ref = split.head(h, self.pooling), forward_fn(x, self.pooling)
            ok = ours.shape == ref.shape and torch.allclose(ours.float(), ref.float(), rtol=1e-3, atol=1e-4)
            problem = None if ok else f"max difference {float((ours.float() - ref.float()).abs().max()):.3g}"
        except Exception as e:  # noqa: BLE001 - any failure means the split does not fit this model
            problem = f"{type(e).__name__}: {e}"
        finally:
            for m, mode in was:
                m.training = mode
        if problem is None:
            return split
        logger.warning("image encoder %s: the %s stem/blocks/head split does not reproduce its forward (%s); "
                       "the whole network runs every step (no lower-part cache)", type(model).__name__, split.kind,
                       problem)
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the block list stopped being registered a second time ("blocks.*")
        for key in [k for k in state_dict if k.startswith(prefix + "blocks.")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _device(self):
        return next(self.encoder.parameters()).device

    @contextlib.contextmanager
    def _frozen_run(self):
        """The network in eval mode under no_grad, its mode restored after."""
        was = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.encoder.train(was)

    def _probe_input(self):
        return self.pixels.normalise(torch.zeros((1,) + tuple(self.pixels.size))).to(self._device())

    def _probe_dim(self, cache_mb, cache_dtype):
        with self._frozen_run():
            x = self._probe_input()
            if self.split is None:
                out = self.forward_fn(x, self.pooling)
            else:
                h = self._run_lower(x)
                if self.cache_lower:
                    self.lower_cache = BoundedRowCache(len(self.pixels.paths), tuple(h.shape[1:]),
                                                       budget_mb=cache_mb, dtype=getattr(torch, cache_dtype),
                                                       name="image lower-part cache")
                out = self._run_upper(h)
        return int(out.shape[-1])

    def train(self, mode=True):
        super().train(mode)
        # frozen parts in eval mode (BatchNorm statistics and dropout): the cache stays valid.
        # Under LoRA the adapted blocks' own weights are frozen too: they stay in eval mode, and
        # only the adapters' dropout follows ``mode``.
        self.encoder.eval()
        if not mode:
            return self
        if self.lora:
            for name, m in self.encoder.named_modules():
                if "lora_dropout" in name:
                    m.train(True)
        else:
            for m in self.trainable_modules:
                m.train(True)
        return self

    def encoder_parameters(self):
        return [p for p in self.encoder.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward
    def _states(self, x, n_blocks):
        """The stem's output, then each of the first ``n_blocks`` blocks' outputs, one at a time."""
        h = self.split.stem(x)
        yield h
        for i in range(n_blocks):
            h = self.split.block(i, h)
            yield h

    def _run_lower(self, x):
        for h in self._states(x, self.n_blocks - self.trainable_layers):
            pass
        return h

    def _run_upper(self, h):
        for i in range(self.n_blocks - self.trainable_layers, self.n_blocks):
            h = self.split.block(i, h)
        return self.split.head(h, self.pooling)

    def _load_pixels(self, rows):
        device = self._device()
        if self.pixel_cache is None:
            return self.pixels.load(rows.cpu()).to(device)
        return self.pixel_cache.get(rows.to(device), lambda todo: self.pixels.load(todo.cpu()).to(device)).float()

    def _lower(self, rows):
        """The frozen part for ``rows``, ``chunk_items`` images at a time: its activations at full
        resolution are large (an EfficientNet's stem: ~5 MB per image), and a batch brings hundreds
        of new items at once."""
        with torch.no_grad():
            parts = [self._run_lower(self.pixels.normalise(self._load_pixels(rows[i:i + self.chunk_items])))
                     for i in range(0, rows.numel(), self.chunk_items)]
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def _encode_rows(self, rows):
        """(len(rows), out_dim): rows with an image through the network, zeros for the others."""
        device = self._device()
        rows = rows.to(device)
        has = self.has_content(rows)
        out = torch.zeros(rows.size(0), self.out_dim, device=device)
        if not has.any():
            return zeros_in_graph(out, self.encoder_parameters(), self.training)
        todo = rows[has]
        if self.split is None:
            vec = torch.cat([self.forward_fn(self.pixels.normalise(self._load_pixels(todo[i:i + self.chunk_items])),
                                             self.pooling) for i in range(0, todo.numel(), self.chunk_items)])
        else:
            if self.cache_lower:
                h = self.lower_cache.get(todo, self._lower)
            else:
                h = self._lower(todo)
            vec = self._run_upper(h)
        gone = ~self.has_content(todo)  # a file that failed to open while loading: no image from now on
        if gone.any():
            vec = vec.masked_fill(gone[:, None], 0.0)
        out = out.to(vec.dtype)
        out[has] = vec
        return out

    # ------------------------------------------------------------------ side adapter taps
    def n_rows(self):
        return len(self.pixels.paths)

    def has_content(self, rows):
        """Items with a readable image (a file found unreadable since is dropped here)."""
        bad = self.pixels.bad.to(rows.device)[rows]
        if bad.any():
            self.available[rows[bad].to(self.available.device)] = False
        return self.available.to(rows.device)[rows]

    def _need_split(self):
        if self.split is None:
            raise ValueError(f"encoder_peft: side needs the image network's stem / blocks / head "
                             f"(ViT-like, ResNet-like or EfficientNet); {type(self.encoder).__name__} has none "
                             "known: use encoder_peft: lora or ~")

    def _tap_states(self, x):
        """Pooled as they come (a full-resolution state is large): the stem's and every block's but
        the last by their mean (a ViT's first token is the same for every image before its blocks),
        then the network's output."""
        from .side import pool_tap

        pooled = []
        for h in self._states(x, self.n_blocks):
            pooled.append(pool_tap(h, "mean"))
        return pooled[:-1] + [self.split.head(h, self.pooling)]

    def tap_dims(self):
        """Widths of :meth:`taps`: the stem, every block but the last, then the output."""
        self._need_split()
        with self._frozen_run():
            return [int(t.shape[-1]) for t in self._tap_states(self._probe_input())]

    def taps(self, rows):
        """(len(rows), sum(tap_dims)) for :class:`~recbole_mm.encoders.side.SideAdapterEncoder`: the
        frozen network's pooled states (stem, each block but the last) and its output, ``chunk_items``
        images at a time."""
        self._need_split()
        with self._frozen_run():
            parts = [torch.cat(self._tap_states(self.pixels.normalise(self._load_pixels(rows[i:i + self.chunk_items]))),
                               -1) for i in range(0, rows.numel(), self.chunk_items)]
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def forward(self, item_ids):
        """``item_ids`` of any shape -> (*item_ids.shape, out_dim) item image vectors."""
        return encode_items(item_ids, self._encode_rows, self.unique_items)


# ============================================================================ loading
def load_image_finetune(encoder, paths, available, background=(255, 255, 255), pooling="pooler", **kwargs):
    """A :class:`FinetuneImageEncoder` for an image feature's ``encoder`` spec (a ``transformers``
    hub name / folder, or ``{type: module, ...}``, :mod:`recbole_mm.data.image_encoders`)."""
    from recbole_mm.data import image_encoders

    spec = image_encoders.parse_image_encoder(encoder, where="finetune image encoder")
    if spec["type"] == "module":
        loaded = image_encoders.ModuleImageEncoder(spec, torch.device("cpu"), fp16=False,
                                                   where="finetune image encoder")
        return FinetuneImageEncoder(loaded.model, module_pixels(spec, paths, background), available,
                                    forward_fn=loaded.features, method=spec["method"], pooling=pooling, **kwargs)
    from recbole_mm.features.encoders import load_vision_model, pool_image_output, resolve_encoder, unwrap_model

    processor, model = load_vision_model(resolve_encoder(spec["name"]), spec["name"])
    model = unwrap_model(model, "vision_model")  # as extraction does: CLIP-like models' vision tower

    def forward_fn(x, pool):
        return pool_image_output(model(pixel_values=x), pool, f"image encoder {spec['name']!r}")

    return FinetuneImageEncoder(model, processor_pixels(processor, paths, background), available,
                                forward_fn=forward_fn, pooling=pooling, **kwargs)
