"""Resumable encoding: finished chunks of an extraction saved atomically and reused by a later
call with the same inputs and settings (:class:`_Chunks`), the input hashing (:func:`sha256_strings`)
and the progress bar the text and image encoders share."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from recbole_mm.atomic import atomic_open, write_json_atomic


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
