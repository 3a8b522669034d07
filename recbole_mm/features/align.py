"""Feature rows in RecBole's internal item-id order.

A :class:`~recbole_mm.features.store.FeatureMatrix` is keyed by raw item tokens;
:func:`align_to_dataset` turns it into a table indexed by RecBole's internal item ids (row 0 is
padding, items without a feature get zeros and a ``missing`` flag). :func:`shared_aligned_table`
writes that table once to ``<dataset_dir>/<dataset>.<name>.aligned-<key>.npy`` (a cache keyed by
the feature and the id order, :func:`aligned_table_key`) and memory-maps it, so the processes using
it share one copy.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import pandas as pd

from recbole_mm.atomic import save_npy_atomic
from recbole_mm.utils import dist_rank_world as _dist_rank_world

from .store import ALIGNED_INFIX, FeatureMatrix, _block_rows, _check_unique, _release_mapped

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- alignment


def _feature_label(fm: FeatureMatrix) -> str:
    return fm.manifest.get("path") or fm.manifest.get("source") or f"feature {fm.name!r}"


def _alignment_plan(fm: FeatureMatrix, id2token, expected_dim: int | None = None):
    """Where each row of the aligned table comes from: ``(rows, src, missing, stats)`` with
    ``table[rows] = fm.matrix[src]`` (``src`` ascending), the missing mask and the stats of
    :func:`align_to_dataset` (logged here). Cheap: no feature row is read."""
    label = _feature_label(fm)
    dim = int(fm.matrix.shape[1])
    if expected_dim is not None and int(expected_dim) != dim:
        raise ValueError(
            f"{label} has feature dim {dim} but the model expects {int(expected_dim)}. Fix: set the "
            f"model's feature dim to {dim} (or leave it unset to infer it), or re-extract the "
            f"feature with an encoder whose output dim is {int(expected_dim)}."
        )
    id2token = np.asarray(id2token).astype(str)
    n_rows = len(id2token)
    dataset_tokens = pd.Index(id2token[1:])
    feature_index = pd.Index(fm.tokens)
    if not feature_index.is_unique:
        _check_unique(fm.tokens, label)

    pos = feature_index.get_indexer(dataset_tokens)  # -1 where the dataset item has no row
    found = pos >= 0
    has_row = np.zeros(n_rows, dtype=bool)
    has_row[1:] = found
    feat_missing = np.asarray(fm.missing, dtype=bool)
    usable = has_row.copy()
    usable[1:][found] &= ~feat_missing[pos[found]]

    rows = np.flatnonzero(usable)
    src = pos[rows - 1]
    order = np.argsort(src, kind="stable")  # monotone reads are kind to memory maps
    rows, src = rows[order], src[order]
    missing = ~usable
    missing[0] = True

    extra = int((pd.Index(id2token).get_indexer(feature_index) < 0).sum())
    n_items = n_rows - 1
    covered = int(usable[1:].sum())
    stats = {
        "name": fm.name,
        "n_items": int(n_items),
        "covered": covered,
        "missing_in_features": int(n_items - covered),
        "absent_from_file": int((~found).sum()),
        "no_content": int(found.sum() - covered),
        "extra_tokens_in_features": extra,
        "dim": dim,
        "coverage": float(covered / n_items) if n_items else 0.0,
    }
    logger.info(
        "feature %r aligned: %d/%d items covered (%.1f%%), %d absent from the file, %d without content, "
        "%d extra tokens in the file ignored",
        fm.name, covered, n_items, 100 * stats["coverage"], stats["absent_from_file"],
        stats["no_content"], extra,
    )
    if stats["absent_from_file"]:
        examples = dataset_tokens[~found][:5].tolist()
        logger.warning("feature %r: %d dataset items have no row in %s (e.g. %s); they get zero features",
                       fm.name, stats["absent_from_file"], label, examples)
    return rows, src, missing, stats


def _gather(fm: FeatureMatrix, rows, src, n_rows: int) -> np.ndarray:
    """The aligned float32 table (zeros where no row is usable), read from ``fm.matrix`` in blocks."""
    table = np.zeros((n_rows, int(fm.matrix.shape[1])), dtype=np.float32)
    step = _block_rows(fm.matrix)  # in blocks: no second whole-table copy while gathering
    for start in range(0, rows.size, step):
        table[rows[start:start + step]] = fm.matrix[src[start:start + step]]
        _release_mapped(fm.matrix)
    return table


def align_to_dataset(fm: FeatureMatrix, id2token, expected_dim: int | None = None):
    """Reorder a feature matrix into RecBole's internal item-id order.

    ``id2token`` is ``dataset.field2id_token[item_field]``: index 0 is the padding item.
    Returns ``(table, missing, stats)``:

    * ``table`` float32 ``(len(id2token), dim)``; row 0 (padding) and rows of items without a
      feature (absent from the file or flagged missing) are zeros;
    * ``missing`` bool ``(len(id2token),)``, True for padding and for items without a feature;
    * ``stats``: ``n_items`` (excluding padding), ``covered``, ``missing_in_features`` (dataset
      items with no usable row), of which ``absent_from_file`` and ``no_content``,
      ``extra_tokens_in_features`` (rows for tokens the dataset does not know: ignored), ``dim``,
      ``coverage``.

    :func:`shared_aligned_table` returns the same table as a read-only-safe memory map of a file
    that every process aligning the same feature to the same item ids shares.
    """
    rows, src, missing, stats = _alignment_plan(fm, id2token, expected_dim)
    return _gather(fm, rows, src, len(missing)), missing, stats


# ----------------------------------------------------------------------------- shared aligned tables

ALIGNED_FORMAT_VERSION = 1


def _feature_file(fm: FeatureMatrix):
    """The .npy file ``fm`` was read from (FeatureStore: manifest ``path``; user file: ``source``)."""
    for key in ("path", "source"):
        value = fm.manifest.get(key)
        if isinstance(value, str) and value.endswith(".npy"):
            return value
    return None


def aligned_table_key(fm: FeatureMatrix, id2token):
    """Short sha256 (16 hex digits) of everything the aligned table depends on: the feature matrix
    (its manifest's ``matrix_sha256``, else the file's size and mtime), its dtype, shape, row
    tokens and missing mask, and the dataset's internal id order ``id2token``. None when the
    matrix can be identified by neither (an in-memory matrix without a checksum)."""
    digest = fm.manifest.get("matrix_sha256")
    if digest is None:
        path = _feature_file(fm)
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        if st is None:
            return None
        digest = f"file:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for part in (f"recbole_mm aligned table v{ALIGNED_FORMAT_VERSION}", str(digest), str(fm.matrix.dtype),
                 repr(tuple(int(n) for n in fm.matrix.shape))):
        h.update(part.encode("utf-8") + b"\0")
    for tokens in (fm.tokens, np.asarray(id2token).astype(str).tolist()):
        h.update(str(len(tokens)).encode("ascii") + b"\0")
        h.update("\0".join(map(str, tokens)).encode("utf-8", "surrogatepass") + b"\0")
    h.update(np.packbits(np.asarray(fm.missing, dtype=bool)).tobytes())
    return h.hexdigest()[:16]


def aligned_table_path(fm: FeatureMatrix, id2token):
    """``<dataset_dir>/<dataset>.<name>.aligned-<key>.npy`` next to the feature's file, or None."""
    path = _feature_file(fm)
    key = aligned_table_key(fm, id2token) if path else None
    if key is None:
        return None
    return path[:-len(".npy")] + ALIGNED_INFIX + key + ".npy"


def _open_aligned(path: str, shape):
    """The cached aligned table at ``path`` as a copy-on-write memory map (``mmap_mode="c"``:
    pages are shared with the page cache and every process mapping the file; a write, which no
    model does to a frozen table, would only make a private copy of that page, never change the
    file nor fault). None when absent or not a float32 table of ``shape``."""
    try:
        table = np.load(path, mmap_mode="c", allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.info("aligned table %s is unreadable (%s): rebuilding it", path, e)
        return None
    if table.dtype != np.float32 or tuple(table.shape) != tuple(shape):
        logger.info("aligned table %s has %s %s, expected float32 %s: rebuilding it",
                    path, table.dtype, tuple(table.shape), tuple(shape))
        return None
    return table


def shared_aligned_table(fm: FeatureMatrix, id2token, expected_dim: int | None = None):
    """:func:`align_to_dataset`, with the table shared on disk: ``(table, missing, stats, path)``.

    The aligned float32 table is written once (atomically) to :func:`aligned_table_path` and
    every process then memory-maps that file (``mmap_mode="c"``, see :func:`_open_aligned`), so
    the DDP ranks of a node and later runs on the same data share its page-cache pages instead
    of each holding a private copy. A file written before for the same feature and item ids is
    reused as is (not rewritten); another feature, feature file or id order gives another key,
    hence another file. Under torch.distributed rank 0 writes it while the other ranks wait;
    a rank that does not see rank 0's file (another node) writes its own.

    The values are those of :func:`align_to_dataset`, bit for bit. Where the file can be neither
    found nor written (a read-only dataset folder, a full disk: any OSError) the in-memory table
    of :func:`align_to_dataset` is returned with ``path`` None, and one line is logged.
    """
    rows, src, missing, stats = _alignment_plan(fm, id2token, expected_dim)
    shape = (len(missing), int(fm.matrix.shape[1]))
    try:
        path = aligned_table_path(fm, id2token)
    except (OSError, ValueError, TypeError) as e:  # pragma: no cover - defensive
        logger.info("feature %r: no shared aligned table (%s)", fm.name, e)
        path = None
    if path is None:
        return _gather(fm, rows, src, shape[0]), missing, stats, None

    def obtain():
        table = _open_aligned(path, shape)
        if table is not None:
            logger.info("feature %r: aligned table shared from %s", fm.name, path)
            return table, path
        table = _gather(fm, rows, src, shape[0])
        try:
            save_npy_atomic(path, table)
            shared = _open_aligned(path, shape)
        except OSError as e:
            logger.warning("feature %r: the aligned table could not be written to %s (%s: %s); this "
                           "process keeps its own copy in memory", fm.name, path, type(e).__name__, e)
            return table, None
        if shared is None:  # pragma: no cover - written but unreadable: keep the private table
            return table, None
        logger.info("feature %r: aligned table written to %s (shared by the processes that use it)",
                    fm.name, path)
        return shared, path

    rank, world = _dist_rank_world()
    if world > 1:
        import torch.distributed as dist

        if rank != 0:
            dist.barrier()  # rank 0 writes the file first
            table, used = obtain()
        else:
            try:
                table, used = obtain()
            finally:
                dist.barrier()
    else:
        table, used = obtain()
    return table, missing, stats, used
