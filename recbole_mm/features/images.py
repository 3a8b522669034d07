"""Image features: each item's image file and their encoding with a vision model.

* :func:`find_item_images` / :func:`image_inputs`: ``<image_dir>/<token>.<ext>`` or a column of the
  ``.item`` file holding paths;
* :func:`encode_images`: a ``transformers`` vision model or a PyTorch module
  (:mod:`recbole_mm.data.image_encoders`); missing, corrupt and unsupported files are reported, never
  raised (loaded by :mod:`recbole_mm.data.images`);
* ``_image_checksum``: the hash of the image files a feature was built from.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Sequence

import numpy as np

from recbole_mm.data import image_encoders
from recbole_mm.data.images import (PROBLEMS as IMAGE_PROBLEMS, image_extensions, open_image, parse_background,
                                    problem_kind, readable_extensions, unsupported_extensions)

from .chunks import _Chunks, _progress, sha256_strings
from .encoders import PoolingError, _load_image_encoder, _pick_device, encoder_fingerprint, pool_image_output
from .item_file import _id_column, _item_tokens, _read_atomic_file

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_DIR = "images"
DEFAULT_IMAGE_CHUNK = 1024
_MAX_PROBLEM_WARNINGS = 20  # per reason; the rest are summarised


# ============================================================================ finding and encoding images


def find_item_images(image_dir, tokens) -> list:
    """Per token, the path of ``<image_dir>/<token>.<ext>`` or None.

    A file Pillow reads (any extension it decodes) is preferred; an item whose only file is in a
    known format Pillow cannot read (SVG, HEIC, PDF ...) gets that file, so that it is reported
    as an unsupported format (convert it), not as a missing image."""
    image_dir = os.fspath(image_dir)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder {image_dir} not found")
    readable, unsupported = readable_extensions(), unsupported_extensions()
    by_stem: dict = {}
    fallback: dict = {}
    for fname in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(fname)
        ext = ext.lower()
        if (ext not in readable and ext not in unsupported) or not os.path.isfile(os.path.join(image_dir, fname)):
            continue
        if ext in unsupported:
            fallback.setdefault(stem, fname)
            continue
        if stem in by_stem:
            logger.warning("several images for item %r in %s; using %s, ignoring %s",
                           stem, image_dir, by_stem[stem], fname)
            continue
        by_stem[stem] = fname
    for stem, fname in fallback.items():
        by_stem.setdefault(stem, fname)
    return [os.path.join(image_dir, by_stem[t]) if t in by_stem else None for t in map(str, tokens)]


def encode_images(paths: Sequence, encoder, batch_size: int = 32, device=None, fp16=None,
                  pooling: str = "pooler", show_progress: bool = True, chunk_dir=None,
                  chunk_size: int = DEFAULT_IMAGE_CHUNK, labels: Sequence | None = None, background=None):
    """Encode image files with a ``transformers`` vision model.

    Returns ``(matrix, missing, problems)``: float32 ``(len(paths), dim)``, bool ``missing``
    (zero rows), and ``problems = {"missing_file": [indices], "corrupt": [indices],
    "unsupported_format": [indices]}``. A path that is None/absent, a file in a format Pillow
    cannot read by design (SVG, HEIC, ...: convert it to PNG/JPEG) or a file Pillow cannot decode
    (corrupt, truncated) is logged as a warning naming the file and skipped -- never raised.
    Transparent images are composited onto ``background`` (``[R, G, B]``, default white; see
    :mod:`recbole_mm.data.images`).

    ``pooling``: ``"pooler"`` uses ``pooler_output`` (flattened) when the model has one, else the
    CLS token (sequence models) / the spatial mean (feature maps); ``"cls"``; ``"mean"``.
    ``labels`` (e.g. item tokens) only make warnings more readable.
    """
    import torch

    paths = [None if p is None or p == "" else os.fspath(p) for p in paths]
    n = len(paths)
    if pooling not in ("mean", "cls", "pooler"):
        raise ValueError(f"unknown pooling {pooling!r}; use 'pooler', 'cls' or 'mean'")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1")
    background = parse_background(background)
    dev = _pick_device(device)
    use_fp16 = (dev.type == "cuda") if fp16 is None else bool(fp16)
    processor, model = _load_image_encoder(encoder, dev, use_fp16)
    dtype = next(model.parameters()).dtype if processor is not None else None

    def forward(images):
        if processor is None:  # a PyTorch module with its own preprocessing (image_encoders.ModuleImageEncoder)
            return model.encode(images, pooling)
        pixel = processor(images=images, return_tensors="pt")["pixel_values"].to(dev, dtype)
        output = model(pixel_values=pixel)
        return pool_image_output(output, pooling, f"image encoder {encoder!r}").cpu().numpy().astype(np.float32)

    key = {"kind": "image", "paths": sha256_strings("" if p is None else p for p in paths),
           "encoder": image_encoders.describe(encoder),
           "fingerprint": image_encoders.fingerprint(encoder, encoder_fingerprint),
           "pooling": pooling, "fp16": use_fp16, "chunk_size": int(chunk_size), "background": list(background)}
    chunks = _Chunks(chunk_dir, key)
    status = np.zeros(n, dtype=np.int8)  # 0 ok, then 1 + index in IMAGE_PROBLEMS (missing_file, corrupt, unsupported)
    codes = {kind: 1 + j for j, kind in enumerate(IMAGE_PROBLEMS)}
    out = None
    dim = None
    reused = 0
    n_chunks = (n + chunk_size - 1) // chunk_size
    warned = {code: 0 for code in codes.values()}

    def label(i):
        return f"item {labels[i]!r} " if labels is not None else ""

    with _progress(n, "encode images", show_progress) as bar, torch.inference_mode():
        for k in range(n_chunks):
            lo, hi = k * chunk_size, min(n, (k + 1) * chunk_size)
            cached = chunks.get(k, hi - lo)
            if cached is not None:
                emb, st = cached["emb"], cached["status"]
                reused += 1
                bar.update(hi - lo)
            else:
                st = np.zeros(hi - lo, dtype=np.int8)
                rows_out = [None] * (hi - lo)
                for b in range(lo, hi, batch_size):
                    idx, images = [], []
                    for i in range(b, min(hi, b + batch_size)):
                        img, reason = open_image(paths[i], background)
                        if img is None:
                            code = codes[problem_kind(reason)]
                            st[i - lo] = code
                            warned[code] += 1
                            if warned[code] <= _MAX_PROBLEM_WARNINGS:
                                logger.warning("image for %s%s: %s", label(i), paths[i] or "(no file)", reason)
                        else:
                            idx.append(i)
                            images.append(img)
                    if images:
                        try:
                            feats = forward(images)
                        except PoolingError:
                            raise
                        except Exception:  # isolate the image the processor/model rejects
                            feats = []
                            for i, img in zip(list(idx), images):
                                try:
                                    feats.append(forward([img])[0])
                                except PoolingError:
                                    raise
                                except Exception as e:
                                    st[i - lo] = codes["corrupt"]
                                    warned[codes["corrupt"]] += 1
                                    logger.warning("image for %s%s: corrupt: %s: %s", label(i), paths[i],
                                                   type(e).__name__, e)
                                    feats.append(None)
                        for i, f in zip(idx, feats):
                            if f is not None:
                                rows_out[i - lo] = f
                                dim = len(f)
                    bar.update(min(hi, b + batch_size) - b)
                if dim is None:
                    dim = _probe_image_dim(forward)
                emb = np.zeros((hi - lo, dim), dtype=np.float32)
                for j, f in enumerate(rows_out):
                    if f is not None:
                        emb[j] = f
                chunks.put(k, emb=emb, status=st)
            status[lo:hi] = st
            if out is None:
                out = np.zeros((n, emb.shape[1]), dtype=np.float32)
                dim = emb.shape[1]
            out[lo:hi] = emb
    if out is None:  # no paths at all
        out = np.zeros((0, _probe_image_dim(forward)), dtype=np.float32)
    for reason, code in codes.items():
        if warned[code] > _MAX_PROBLEM_WARNINGS:
            logger.warning("... %d more images with reason %r", warned[code] - _MAX_PROBLEM_WARNINGS, reason)
    if reused:
        logger.info("resumed image encoding: reused %d/%d finished chunks from %s", reused, n_chunks, chunks.dir)
    problems = {reason: np.flatnonzero(status == code).tolist() for reason, code in codes.items()}
    if problems["unsupported_format"]:
        examples = [os.path.basename(paths[i]) for i in problems["unsupported_format"][:5]]
        logger.warning("%d item image(s) are in a format Pillow cannot read (e.g. %s): convert them to PNG or "
                       "JPEG; until then those items are image-less", len(problems["unsupported_format"]),
                       ", ".join(examples))
    return out, status != 0, problems


def _probe_image_dim(forward) -> int:
    from PIL import Image

    return int(forward([Image.new("RGB", (64, 64), (127, 127, 127))]).shape[1])


def _file_digest(path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


# ============================================================================ a feature's inputs and their checksum


def image_inputs(dataset_dir, dataset_name, spec, item_file):
    """(tokens, paths, source description) for an image feature."""
    image_field = spec.get("image_field")
    image_dir = spec.get("image_dir")
    if image_dir is not None and not os.path.isabs(image_dir):
        image_dir = os.path.join(dataset_dir, image_dir)
    if image_field is not None:
        df, types = _read_atomic_file(item_file)
        id_col = _id_column(df, types, spec.get("id_field"), item_file)
        if image_field not in df.columns:
            raise ValueError(f"{item_file}: unknown image column {image_field!r}; "
                             f"available columns: {list(df.columns)}")
        tokens = _item_tokens(df, id_col, item_file)
        base = image_dir if image_dir is not None else dataset_dir
        paths = []
        for v in df[image_field].str.strip():
            paths.append(None if not v else (v if os.path.isabs(v) else os.path.join(base, v)))
        return tokens, paths, {"image_field": image_field, "image_base": os.path.relpath(base, dataset_dir)}
    if image_dir is None:
        image_dir = os.path.join(dataset_dir, DEFAULT_IMAGE_DIR)
    if os.path.isfile(item_file):
        df, types = _read_atomic_file(item_file)
        tokens = _item_tokens(df, _id_column(df, types, spec.get("id_field"), item_file), item_file)
    else:
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"neither {item_file} nor the image folder {image_dir} exists")
        exts = image_extensions()
        tokens = sorted({os.path.splitext(f)[0] for f in os.listdir(image_dir)
                         if os.path.splitext(f)[1].lower() in exts})
        logger.info("%s not found: using the %d image file names in %s as item tokens",
                    item_file, len(tokens), image_dir)
    paths = find_item_images(image_dir, tokens)
    return tokens, paths, {"image_dir": os.path.relpath(image_dir, dataset_dir)}


def _image_checksum(tokens, paths) -> str:
    h = hashlib.sha256()
    for t, p in zip(tokens, paths):
        exists = p is not None and os.path.isfile(p)
        h.update(f"{t}\0{os.path.basename(p) if p else ''}\0{int(exists)}\0".encode("utf-8"))
        if exists:
            _file_digest(p, h)
    return h.hexdigest()
