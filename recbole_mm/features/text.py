"""Text features: item texts read from the ``.item`` file (fields, templates, missing values) and
their encoding with a ``transformers`` text encoder.

* :func:`read_item_texts`: item tokens and texts (``fields``, ``template``, ``missing_values``:
  :func:`normalize_missing_values`);
* :func:`encode_texts`: batched (sorted by length), resumable (chunks), ``mean``/``cls``/``pooler``.
"""

from __future__ import annotations

import logging
import os
import string
from typing import Sequence

import numpy as np

from .chunks import _Chunks, _progress, sha256_strings
from .encoders import (DEFAULT_TEXT_ENCODER, _load_text_encoder, _pick_device, _pool, encoder_fingerprint,
                       resolve_encoder)
from .item_file import _id_column, _item_tokens, _read_atomic_file

logger = logging.getLogger(__name__)

TEXT_FIELD_TYPES = ("token", "token_seq")
DEFAULT_TEXT_CHUNK = 4096
# text field values read as "no value" (compared stripped and case-insensitively); an item whose
# every text field is missing has no text: zero row, flagged missing
DEFAULT_MISSING_VALUES = ("nan", "none", "null", "n/a", "na", "")


# ============================================================================ encoding


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


# ============================================================================ item texts


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
