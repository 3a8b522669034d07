"""Crash-safe file writing: every file recbole_mm writes goes through a temporary file in the
same folder and an ``os.replace``, so a run that dies (Ctrl-C, SIGTERM, out of memory, a full
disk) leaves either the previous file or the new one, never a truncated one.

``atomic_path`` is the primitive (for writers that want a file name, such as ``torch.save`` or a
library that writes the file itself); the others are the common cases built on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
from typing import Any, Iterator

__all__ = [
    "atomic_path", "atomic_open", "write_text_atomic", "write_json_atomic", "save_npy_atomic",
    "torch_save_atomic", "copy_file_atomic",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; move it onto ``path`` if the block succeeds.

    The temporary file is named ``.tmp-<random><extension>`` in the target's folder (created if
    needed), so the rename never crosses file systems and concurrent writers never share it. On
    any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is left
    as it was. A new file gets ``0o666 & ~umask`` like ``open(path, "w")``; overwriting an existing
    file keeps its mode.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _create_temporary(directory, os.path.splitext(path)[1])
    try:
        yield tmp
        _keep_mode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _create_temporary(directory: str, suffix: str) -> str:
    # Not tempfile.mkstemp: it creates 0600 files. Created with 0666 here, the kernel applies the
    # umask (and a folder's default ACL), exactly as for open(path, "w"), with no os.umask()
    # round trip (process-wide, not thread-safe).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}{suffix}")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue


def _keep_mode(path: str, tmp: str) -> None:
    # Overwriting an existing file keeps its permission bits, as open(path, "w") would.
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any):
    """``open`` for writing through :func:`atomic_path`; the data is fsynced before the rename."""
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, data: str | bytes, mode: str = "w") -> str:
    """Write ``data`` (text, or bytes with ``mode="wb"``) to ``path`` atomically; returns ``path``."""
    with atomic_open(path, mode) as f:
        f.write(data)
    return os.fspath(path)


def write_json_atomic(path: str | os.PathLike, payload: Any, **dump_kwargs: Any) -> str:
    """Write ``payload`` as JSON (``indent=2`` unless given) to ``path`` atomically."""
    dump_kwargs.setdefault("indent", 2)
    with atomic_open(path, "w") as f:
        json.dump(payload, f, **dump_kwargs)
    return os.fspath(path)


def save_npy_atomic(path: str | os.PathLike, array) -> None:
    """``np.save`` (no pickles) to ``path`` atomically."""
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp, pickle_protocol=4)


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is never seen half-copied."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
