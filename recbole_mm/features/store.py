"""The feature store: per-item feature matrices keyed by RAW item tokens.

A feature called ``<name>`` of dataset ``<dataset>`` lives next to the dataset as

* ``<dataset_dir>/<dataset>.<name>.npy``  -- the (n_items, dim) matrix, float32 or float16
* ``<dataset_dir>/<dataset>.<name>.json`` -- the manifest: encoder, type, fields/template or
  image source, pooling, dim, dtype, n_items, the item tokens (row order), the sha256 of the
  inputs, the sha256 of the matrix data (``matrix_sha256``, verified on load), the tokens that had
  no usable content (``missing``; their rows are zeros), the format version and the creation time.

A matrix that disagrees with its manifest (shape, dtype or checksum: it was replaced or edited by
hand) is an error, never silently used or overwritten.  A feature imported with
:meth:`FeatureStore.import_matrix` (manifest ``type: user``) is never overwritten by extraction;
:func:`load_user_features` reads a user's ``.npy`` + tokens file without storing it.

Rows are keyed by the raw item token (the string in the dataset's ``.item``/``.inter`` files),
never by RecBole's remapped integer ids, so a feature file stays valid whatever filtering RecBole
applies; :mod:`recbole_mm.features.align` turns a :class:`FeatureMatrix` into a table indexed by
RecBole's internal item ids.

Writes are atomic: the old manifest is removed first, the matrix is written to a temporary file
and renamed into place, and the manifest is renamed into place LAST, so an interrupted write never
leaves a matrix that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from recbole_mm.atomic import save_npy_atomic, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# key fields that only change the encoder's inputs: a manifest from before such a key existed is
# still fresh when its input checksum (of the texts actually encoded) matches
KEYS_DECIDED_BY_INPUTS = ("missing_values",)
ALLOWED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_FINITE_CHECK_ROWS = 65536  # rows checked per block when scanning for NaN/inf
_SCAN_BLOCK_BYTES = 32 << 20  # at most this many bytes per block when hashing/scanning a matrix
USER_TYPE = "user"  # manifest ``type`` of features imported by the user: never overwritten by extraction
# the aligned tables of a feature (recbole_mm.features.align) sit next to it; FeatureStore.delete removes them
ALIGNED_INFIX = ".aligned-"  # <dataset_dir>/<dataset>.<name>.aligned-<key>.npy


@dataclass
class FeatureMatrix:
    """A feature matrix with its row keys.

    ``matrix[i]`` is the feature of raw item token ``tokens[i]``; ``missing[i]`` is True where the
    item had no usable content (its row is all zeros).  ``matrix`` is a read-only memory map when
    loaded with ``FeatureStore.load(..., mmap=True)``.
    """

    name: str
    tokens: list
    matrix: np.ndarray
    missing: np.ndarray
    manifest: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.tokens)


# ----------------------------------------------------------------------------- validation helpers


def _as_token_list(tokens: Iterable) -> list:
    return [str(t) for t in tokens]


def _check_unique(tokens: Sequence[str], where: str) -> None:
    index = pd.Index(tokens)
    if not index.is_unique:
        dups = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"{where}: duplicate item tokens {dups} -- every item must have exactly one row."
        )


def _check_finite(matrix: np.ndarray, tokens: Sequence[str], where: str) -> None:
    _, bad, n_bad = _scan(matrix, want_sha=False, want_finite=True)
    if bad.size:
        _raise_nonfinite(where, tokens, bad, n_bad)


def _raise_nonfinite(where: str, tokens, bad, n_bad) -> None:
    names = [tokens[i] for i in bad] if len(tokens) > int(np.max(bad)) else np.asarray(bad).tolist()
    raise ValueError(
        f"{where}: {n_bad} row(s) contain NaN or inf values; first bad item tokens: {names}. "
        "Re-extract the features (e.g. without fp16 if the encoder overflows) or fix the file."
    )


def _check_matrix(matrix, where: str) -> np.ndarray:
    if not isinstance(matrix, np.ndarray):
        matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"{where}: the feature matrix must be 2-D (n_items, dim), got shape {matrix.shape}")
    if matrix.dtype not in ALLOWED_DTYPES:
        if np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer):
            matrix = matrix.astype(np.float32)
        else:
            raise ValueError(f"{where}: the feature matrix must be float32 or float16, got {matrix.dtype}")
    return matrix


def _block_rows(matrix) -> int:
    row_bytes = max(1, int(matrix.shape[1]) * matrix.dtype.itemsize) if matrix.ndim == 2 else 1
    return max(1, min(_FINITE_CHECK_ROWS, _SCAN_BLOCK_BYTES // row_bytes))


def matrix_sha256(matrix) -> str:
    """sha256 of a matrix's data (C order), read in blocks of rows (memory-map friendly)."""
    h = hashlib.sha256()
    step = _block_rows(matrix)
    for start in range(0, matrix.shape[0], step):
        h.update(np.ascontiguousarray(matrix[start:start + step]).data)
    return h.hexdigest()


def _release_mapped(matrix) -> None:
    """Tell the kernel this process no longer needs the pages of a read-only memory map it has
    read (``MADV_DONTNEED``): they leave the process's resident set (they stay in the page cache,
    reclaimable), so reading a large feature file once does not count as resident memory for
    the rest of the run. A no-op for in-memory arrays and where ``madvise`` is unavailable."""
    import mmap

    handle = getattr(matrix, "_mmap", None)
    if handle is None or not hasattr(handle, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    with contextlib.suppress(OSError, ValueError):
        handle.madvise(mmap.MADV_DONTNEED)


def _scan(matrix, want_sha: bool, want_finite: bool, limit: int = 5):
    """One pass over ``matrix``: (sha256 or None, first ``limit`` non-finite row indices, count)."""
    h = hashlib.sha256() if want_sha else None
    bad: list = []
    n_bad = 0
    step = _block_rows(matrix)
    if want_sha or want_finite:
        for start in range(0, matrix.shape[0], step):
            block = np.ascontiguousarray(matrix[start:start + step])
            if h is not None:
                h.update(block.data)
            if want_finite:
                rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
                n_bad += int(rows.size)
                if len(bad) < limit:
                    bad.extend((rows[:limit - len(bad)] + start).tolist())
            _release_mapped(matrix)  # block by block: at most one block of the file resident
    return (h.hexdigest() if h is not None else None), np.asarray(bad, dtype=np.int64), n_bad


def _short(value, width: int = 60) -> str:
    """A short printable form of a manifest value (checksums cut to 12 hex digits)."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def describe_changes(changes) -> str:
    """``"template: 'a' -> 'b'; input_checksum: 1f2e.. -> 9a8b.."`` from ``[(key, old, new), ...]``."""
    return "; ".join(f"{key}: {_short(old)} -> {_short(new)}" for key, old, new in changes)


@dataclass
class FeatureStatus:
    """What :meth:`FeatureStore.freshness` found.

    ``state``: ``"absent"`` (no usable manifest/matrix: build it), ``"fresh"`` (up to date),
    ``"stale"`` (built from other inputs/settings: ``changes`` lists ``(key, old, new)``),
    ``"incomplete"`` (up to date, but without rows for the requested ``lacking`` items) or
    ``"user"`` (imported by the user: used as is, never rebuilt).  ``note`` explains an
    ``"absent"`` state that still has files (e.g. a matrix without a manifest) and an
    ``"incomplete"`` one.
    """

    state: str
    changes: list = field(default_factory=list)
    manifest: dict | None = None
    note: str = ""
    lacking: list = field(default_factory=list)

    @property
    def fresh(self) -> bool:
        return self.state == "fresh"

    def describe(self) -> str:
        return describe_changes(self.changes) if self.changes else self.note


atomic_save_npy = save_npy_atomic


def _read_npy_header(path: str):
    """(shape, dtype) of a .npy file without reading its data."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return tuple(arr.shape), arr.dtype


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- the store


class FeatureStore:
    """Feature files ``<dataset_dir>/<dataset_name>.<name>.{npy,json}``."""

    def __init__(self, dataset_dir, dataset_name: str):
        self.dataset_dir = os.fspath(dataset_dir)
        self.dataset_name = str(dataset_name)

    def __repr__(self) -> str:
        return f"FeatureStore({self.dataset_dir!r}, {self.dataset_name!r})"

    # -- paths ----------------------------------------------------------------
    def paths(self, name: str):
        """``(npy_path, manifest_path)`` of feature ``name``."""
        if not name or os.sep in name or (os.altsep and os.altsep in name):
            raise ValueError(f"invalid feature name {name!r}")
        base = os.path.join(self.dataset_dir, f"{self.dataset_name}.{name}")
        return base + ".npy", base + ".json"

    def chunk_dir(self, name: str) -> str:
        """Folder holding the resumable chunks of an extraction in progress."""
        return os.path.join(self.dataset_dir, f".{self.dataset_name}.{name}.chunks")

    @contextlib.contextmanager
    def build_lock(self, name: str):
        """Exclusive lock while feature ``name`` is checked and built, so that processes sharing a
        dataset folder (a study running cells in parallel, two users) build it once: the others
        wait, then find it fresh. A no-op under torch.distributed (ranks coordinate with barriers)
        and where ``fcntl`` is unavailable."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            fcntl = None
        import torch.distributed as dist

        if fcntl is None or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            yield
            return
        path = os.path.join(self.dataset_dir, f".{self.dataset_name}.{name}.lock")
        handle = None
        try:
            os.makedirs(self.dataset_dir, exist_ok=True)
            handle = open(path, "a+")
        except OSError as e:
            try:  # a read-only folder may still hold the lock file: flock works on a read handle
                handle = open(path, "r")
            except OSError:
                # Reading a fresh feature needs no lock; a build checks that it can write first
                # (check_writable) and fails with a clear message.
                logger.debug("cannot open the build lock %s (%s): proceeding without it", path, e)
        if handle is None:
            yield
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                logger.info("feature %r of %s is being built by another process; waiting for it (%s)",
                            name, self.dataset_name, path)
                t0 = time.perf_counter()
                fcntl.flock(handle, fcntl.LOCK_EX)
                logger.info("feature %r: waited %.1fs for the other process", name, time.perf_counter() - t0)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def exists(self, name: str) -> bool:
        npy, man = self.paths(name)
        return os.path.isfile(npy) and os.path.isfile(man)

    def check_writable(self, name: str) -> None:
        """Raise a clear PermissionError when feature ``name`` could not be written here (call it
        BEFORE a long extraction, not after)."""
        npy, man = self.paths(name)
        try:
            os.makedirs(self.dataset_dir, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.dataset_dir, prefix=f".{self.dataset_name}.{name}.write-test-")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise PermissionError(
                f"feature {name!r} of dataset {self.dataset_name!r} has to be (re)built, but the dataset "
                f"folder {self.dataset_dir} is not writable ({type(e).__name__}: {e}); it would be saved "
                f"there as {os.path.basename(npy)} + {os.path.basename(man)}. Fix: make the folder "
                "writable, or copy the dataset to a writable place and set data_path to it (or build "
                "the feature elsewhere and copy the two files in)."
            ) from None

    def _mismatch_error(self, name: str, what: str) -> ValueError:
        npy, man = self.paths(name)
        return ValueError(
            f"{npy} does not match its manifest {man}: {what}. The matrix was replaced or edited "
            "after it was written, so its rows can no longer be trusted to belong to the manifest's "
            "item tokens. Fix: if you replaced the matrix on purpose, import it with "
            f"FeatureStore({self.dataset_dir!r}, {self.dataset_name!r}).import_matrix({name!r}, tokens, "
            "matrix) (it writes a matching manifest; a user feature is then used as is); otherwise "
            f"delete both files (or FeatureStore.delete({name!r})) to re-extract the feature."
        )

    def _check_header(self, name: str, manifest: dict, shape, dtype) -> None:
        """Raise when the matrix's shape/dtype disagree with the manifest."""
        tokens = manifest.get("tokens")
        n_tokens = len(tokens) if isinstance(tokens, list) else None
        expected = (manifest.get("n_items", n_tokens), manifest.get("dim", shape[1] if len(shape) == 2 else None))
        problems = []
        if len(shape) != 2:
            problems.append(f"shape: the matrix has shape {tuple(shape)}, expected a 2-D (n_items, dim) matrix")
        elif tuple(shape) != tuple(expected) or (n_tokens is not None and shape[0] != n_tokens):
            problems.append(f"shape: matrix {tuple(shape)}, manifest ({expected[0]}, {expected[1]}) "
                            f"with {n_tokens} item tokens")
        if manifest.get("dtype") is not None and str(dtype) != manifest.get("dtype"):
            problems.append(f"dtype: matrix {dtype}, manifest {manifest.get('dtype')}")
        if problems:
            raise self._mismatch_error(name, "; ".join(problems))

    def _check_checksum(self, name: str, manifest: dict, digest) -> None:
        expected = manifest.get("matrix_sha256")
        if expected is None:
            logger.debug("feature %r of %s: the manifest has no matrix checksum (written by an older "
                         "version): not verified", name, self.dataset_name)
            return
        if digest != expected:
            raise self._mismatch_error(
                name, f"checksum: matrix data sha256 {_short(digest)}, manifest matrix_sha256 "
                      f"{_short(expected)} (same shape and dtype: rows reordered or values changed)")

    def verify(self, name: str) -> None:
        """Raise ValueError when the matrix disagrees with its manifest (shape, dtype, checksum)."""
        npy, _ = self.paths(name)
        manifest = self.read_manifest(name)
        if manifest is None or not os.path.isfile(npy):
            return
        try:
            matrix = np.load(npy, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{npy}: unreadable feature matrix ({e}); delete it and re-extract") from None
        self._check_header(name, manifest, matrix.shape, matrix.dtype)
        if manifest.get("matrix_sha256") is not None:
            self._check_checksum(name, manifest, matrix_sha256(matrix))

    def read_manifest(self, name: str):
        """The manifest dict, or None when absent/unreadable."""
        _, man = self.paths(name)
        try:
            with open(man, "r", encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # -- freshness ------------------------------------------------------------
    def freshness(self, name: str, manifest_key: dict, verify_checksum: bool = True,
                  items: Iterable | None = None) -> FeatureStatus:
        """Compare the cached feature with ``manifest_key`` (what determines it: encoder, fields,
        template, pooling, the input checksum of the items it holds, ...).

        ``items`` (raw tokens): the items a request needs rows for; a feature matching the key
        but holding no row for some of them is ``"incomplete"`` (``lacking`` lists them), one
        holding more rows than requested is fresh.

        Returns a :class:`FeatureStatus`.  A matrix that disagrees with its manifest (shape, dtype,
        and with ``verify_checksum`` the data checksum) raises ValueError naming both files and the
        fixes: such a file was replaced by hand and is neither used nor overwritten silently.
        """
        npy, man = self.paths(name)
        has_npy = os.path.isfile(npy)
        manifest = self.read_manifest(name)
        if manifest is None:
            if os.path.isfile(man):
                return FeatureStatus("absent", note=f"its manifest {man} is unreadable")
            if has_npy:
                return FeatureStatus("absent", note=f"{npy} has no manifest {os.path.basename(man)} "
                                                    "(an interrupted build, or a matrix put there by hand: "
                                                    "import your own matrices with FeatureStore.import_matrix)")
            return FeatureStatus("absent")
        if not has_npy:
            return FeatureStatus("absent", manifest=manifest, note=f"its matrix {npy} is missing")
        try:
            shape, dtype = _read_npy_header(npy)
        except (OSError, ValueError) as e:
            raise ValueError(f"{npy}: unreadable feature matrix ({e}); delete it and its manifest {man} "
                             "to re-extract, or import your own with FeatureStore.import_matrix") from None
        self._check_header(name, manifest, shape, dtype)
        if verify_checksum and manifest.get("matrix_sha256") is not None:
            self._check_checksum(name, manifest, matrix_sha256(np.load(npy, mmap_mode="r", allow_pickle=False)))
        if manifest.get("type") == USER_TYPE:
            return FeatureStatus("user", manifest=manifest)
        changes = []
        if manifest.get("format_version") != FORMAT_VERSION:
            changes.append(("format_version", manifest.get("format_version"), FORMAT_VERSION))
        for key, value in manifest_key.items():
            if key in KEYS_DECIDED_BY_INPUTS and key not in manifest and "input_checksum" in manifest_key:
                continue  # written before the key existed: the input checksum already tells
            old = _jsonable(manifest.get(key))
            if old != _jsonable(value):
                changes.append((key, old, _jsonable(value)))
        if changes:
            return FeatureStatus("stale", changes=changes, manifest=manifest)
        if items is not None:
            held = set(_as_token_list(manifest.get("tokens") or []))
            requested = _as_token_list(items)
            lacking = [t for t in requested if t not in held]
            if lacking:
                return FeatureStatus(
                    "incomplete", manifest=manifest, lacking=lacking,
                    note=f"it holds rows for {len(held)} items, but not for {len(lacking)} of the "
                         f"{len(set(requested))} requested (e.g. {lacking[:5]})")
        return FeatureStatus("fresh", manifest=manifest)

    def is_fresh(self, name: str, manifest_key: dict, verify_checksum: bool = True,
                 items: Iterable | None = None) -> bool:
        """True when the cached feature exists, its manifest matches every field of ``manifest_key``
        and it holds a row for each of ``items`` (when given).

        A missing/unreadable manifest, a missing matrix, a user-imported feature or any key
        difference means "not fresh".  A matrix that disagrees with its manifest (shape, dtype,
        checksum) raises ValueError (see :meth:`freshness`).
        """
        status = self.freshness(name, manifest_key, verify_checksum=verify_checksum, items=items)
        if status.state in ("stale", "incomplete"):
            logger.info("feature %r is stale: %s", name, status.describe())
        return status.fresh

    # -- write ----------------------------------------------------------------
    def save(self, name: str, tokens, matrix, missing=None, manifest: dict | None = None,
             replace_user: bool = False) -> FeatureMatrix:
        """Validate and atomically write a feature; returns it loaded back (memory-mapped).

        ``missing`` is a bool array (or None = no item missing).  ``manifest`` holds the
        descriptive/key fields (encoder, type, fields, template, pooling, input_checksum, ...);
        dim, dtype, n_items, tokens, missing, matrix_sha256, format_version and created are filled
        in here.  A user-imported feature (``type: user``) is only replaced by another import or
        with ``replace_user=True``.
        """
        npy, man = self.paths(name)
        new_type = (manifest or {}).get("type")
        if not replace_user and new_type != USER_TYPE:
            old = self.read_manifest(name)
            if old is not None and old.get("type") == USER_TYPE:
                raise ValueError(
                    f"feature {name!r} of dataset {self.dataset_name!r} ({npy}) was imported by the user "
                    f"(source {old.get('source')!r}) and is not overwritten by a {new_type or 'computed'} "
                    f"feature. To replace it, delete {npy} and {man} (or FeatureStore.delete({name!r})) first."
                )
        tokens = _as_token_list(tokens)
        matrix = _check_matrix(matrix, npy)
        if matrix.shape[0] != len(tokens):
            raise ValueError(
                f"{npy}: matrix has {matrix.shape[0]} rows but {len(tokens)} item tokens were given"
            )
        _check_unique(tokens, npy)
        matrix = np.ascontiguousarray(matrix)
        digest, bad, n_bad = _scan(matrix, want_sha=True, want_finite=True)
        if bad.size:
            _raise_nonfinite(npy, tokens, bad, n_bad)
        if missing is None:
            missing = np.zeros(len(tokens), dtype=bool)
        missing = np.asarray(missing, dtype=bool)
        if missing.shape != (len(tokens),):
            raise ValueError(f"{npy}: missing mask has shape {missing.shape}, expected ({len(tokens)},)")

        full = dict(_jsonable(manifest or {}))
        full.pop("path", None)
        full.update(
            format_version=FORMAT_VERSION,
            name=name,
            dataset=self.dataset_name,
            dim=int(matrix.shape[1]),
            dtype=str(matrix.dtype),
            n_items=len(tokens),
            n_missing=int(missing.sum()),
            matrix_sha256=digest,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            missing=[tokens[i] for i in np.flatnonzero(missing)],
            tokens=tokens,
        )
        os.makedirs(self.dataset_dir, exist_ok=True)
        # the old manifest goes first: a crash from here on leaves no valid-looking feature
        if os.path.exists(man):
            os.remove(man)
        atomic_save_npy(npy, matrix)
        write_json_atomic(man, full, ensure_ascii=False, indent=1)  # LAST
        logger.info("saved feature %r: %d items x %d (%s), %d missing -> %s",
                    name, len(tokens), matrix.shape[1], matrix.dtype, int(missing.sum()), npy)
        return self.load(name, mmap=True, check_finite=False, verify_checksum=False)

    def import_matrix(self, name: str, tokens, matrix, source: str = "user", missing=None,
                      manifest: dict | None = None) -> FeatureMatrix:
        """Store a matrix produced elsewhere (any encoder) under feature ``name``.

        ``missing`` defaults to the all-zero rows.  ``source`` is recorded in the manifest.  The
        feature gets ``type: user``: :func:`~recbole_mm.features.extract.extract_features` uses it as
        is (its spec is ignored) and never overwrites it; delete it to extract instead.
        """
        matrix = _check_matrix(matrix, f"imported feature {name!r}")
        if missing is None:
            missing = ~np.asarray(matrix != 0).any(axis=1)
        info = {"encoder": "user", "source": str(source)}
        info.update(manifest or {})
        info["type"] = USER_TYPE
        return self.save(name, tokens, matrix, missing, info)

    def delete(self, name: str) -> None:
        """Remove feature ``name``: its manifest (first), its matrix and its aligned tables
        (``<dataset>.<name>.aligned-*.npy``, :func:`shared_aligned_table`)."""
        npy, man = self.paths(name)
        for p in (man, npy):  # manifest first
            if os.path.exists(p):
                os.remove(p)
        self.delete_aligned(name)

    def delete_aligned(self, name: str) -> list:
        """Remove the aligned tables of feature ``name`` (caches: rebuilt when needed; a process
        that has one mapped keeps reading it). Returns the removed paths."""
        import glob

        npy, _ = self.paths(name)
        pattern = glob.escape(npy[:-len(".npy")] + ALIGNED_INFIX) + "*.npy"
        removed = []
        for p in glob.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
                removed.append(p)
        return removed

    # -- read -----------------------------------------------------------------
    def load(self, name: str, mmap: bool = True, check_finite: bool = True,
             verify_checksum: bool = True) -> FeatureMatrix:
        """Load feature ``name`` (memory-mapped by default) with full validation: shape, dtype and
        (``verify_checksum``) data checksum against the manifest, unique tokens and
        (``check_finite``) no NaN/inf -- one pass over the matrix for both."""
        npy, man = self.paths(name)
        if not os.path.isfile(man) or not os.path.isfile(npy):
            absent = man if not os.path.isfile(man) else npy
            raise FileNotFoundError(
                f"feature {name!r} of dataset {self.dataset_name!r} not found ({absent} is missing). "
                f"Extract it first, e.g.\n  python -m recbole_mm.data.extract --dataset_dir "
                f"{self.dataset_dir} --dataset {self.dataset_name} --name {name} --type text "
                "[--fields ...] [--template ...]\n"
                "or import your own matrix with FeatureStore.import_matrix / load_user_features."
            )
        try:
            with open(man, "r", encoding="utf-8") as f:
                manifest = json.load(f)
        except ValueError as e:
            raise ValueError(f"{man}: unreadable manifest ({e}); delete it and re-extract") from None
        try:
            matrix = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{npy}: unreadable feature matrix ({e}); delete it and re-extract") from None
        tokens = manifest.get("tokens")
        if tokens is None:
            raise ValueError(f"{man}: manifest has no 'tokens' list")
        tokens = _as_token_list(tokens)
        self._check_header(name, manifest, matrix.shape, matrix.dtype)
        if matrix.dtype not in ALLOWED_DTYPES:
            raise ValueError(f"{npy}: dtype {matrix.dtype} is not float32/float16")
        _check_unique(tokens, man)
        want_sha = verify_checksum and manifest.get("matrix_sha256") is not None
        digest, bad, n_bad = _scan(matrix, want_sha=want_sha, want_finite=check_finite)
        if bad.size:  # the most specific report first: it names the bad items
            _raise_nonfinite(npy, tokens, bad, n_bad)
        if verify_checksum:  # (an old manifest without a checksum is accepted; logged at debug)
            self._check_checksum(name, manifest, digest)
        missing = pd.Index(tokens).isin(manifest.get("missing", []))
        manifest["path"] = npy  # in memory only: lets error messages name the file
        return FeatureMatrix(name=name, tokens=tokens, matrix=matrix,
                             missing=np.asarray(missing, dtype=bool), manifest=manifest)


# ----------------------------------------------------------------------------- user files


def read_tokens_file(tokens_path) -> list:
    """Item tokens from a text file (one per line) or a JSON list."""
    tokens_path = os.fspath(tokens_path)
    if not os.path.isfile(tokens_path):
        raise FileNotFoundError(f"tokens file {tokens_path} not found")
    with open(tokens_path, "r", encoding="utf-8") as f:
        text = f.read()
    if tokens_path.endswith(".json"):
        tokens = json.loads(text)
        if isinstance(tokens, dict) and "tokens" in tokens:
            tokens = tokens["tokens"]
        if not isinstance(tokens, list):
            raise ValueError(f"{tokens_path}: expected a JSON list of item tokens")
        return _as_token_list(tokens)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return [line.rstrip("\r") for line in lines]


def load_user_features(npy_path, tokens_path, name: str | None = None, mmap: bool = True) -> FeatureMatrix:
    """Load a user-supplied ``.npy`` matrix whose rows are keyed by the tokens in ``tokens_path``.

    The tokens file holds one raw item token per line (or a JSON list).  All-zero rows are
    treated as missing.  The same checks as :meth:`FeatureStore.load` apply.
    """
    npy_path = os.fspath(npy_path)
    if not os.path.isfile(npy_path):
        raise FileNotFoundError(f"feature matrix {npy_path} not found")
    tokens = read_tokens_file(tokens_path)
    matrix = np.load(npy_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if matrix.ndim != 2:
        raise ValueError(f"{npy_path}: expected a 2-D (n_items, dim) matrix, got shape {matrix.shape}")
    if matrix.dtype not in ALLOWED_DTYPES:
        matrix = _check_matrix(np.asarray(matrix), npy_path)
    if matrix.shape[0] != len(tokens):
        raise ValueError(
            f"{npy_path} has {matrix.shape[0]} rows but {tokens_path} lists {len(tokens)} tokens"
        )
    _check_unique(tokens, os.fspath(tokens_path))
    _check_finite(matrix, tokens, npy_path)
    missing = np.zeros(len(tokens), dtype=bool)
    for start in range(0, matrix.shape[0], _FINITE_CHECK_ROWS):
        block = np.asarray(matrix[start:start + _FINITE_CHECK_ROWS])
        missing[start:start + block.shape[0]] = ~(block != 0).any(axis=1)
    if name is None:
        name = os.path.splitext(os.path.basename(npy_path))[0]
    manifest = {"type": "user", "encoder": "user", "source": npy_path, "tokens_file": os.fspath(tokens_path),
                "dim": int(matrix.shape[1]), "dtype": str(matrix.dtype), "n_items": len(tokens)}
    return FeatureMatrix(name=name, tokens=tokens, matrix=matrix, missing=missing, manifest=manifest)
