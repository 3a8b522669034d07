"""recbole_mm.atomic: a writer that dies leaves the previous file intact and no temporary file."""

import json
import os

import numpy as np
import pytest
import torch

from recbole_mm.compat import torch_load
from recbole_mm.atomic import (
    atomic_open, copy_file_atomic, save_npy_atomic, torch_save_atomic, write_json_atomic, write_text_atomic,
)


def test_writers_produce_the_file_and_leave_no_temporary(tmp_path):
    write_text_atomic(tmp_path / "a" / "t.md", "hello\n")  # the folder is created
    write_text_atomic(tmp_path / "b.bin", b"\x00\x01", mode="wb")
    write_json_atomic(tmp_path / "c.json", {"x": [1, 2]})
    save_npy_atomic(tmp_path / "d.npy", np.arange(4, dtype=np.float32))
    torch_save_atomic({"w": torch.ones(2)}, tmp_path / "e.pth")
    copy_file_atomic(tmp_path / "c.json", tmp_path / "f.json")
    assert (tmp_path / "a" / "t.md").read_text() == "hello\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "f.json").read_text()) == {"x": [1, 2]}
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), np.arange(4, dtype=np.float32))
    assert torch.equal(torch_load(str(tmp_path / "e.pth"))["w"], torch.ones(2))
    leftovers = [p.name for p in tmp_path.rglob(".tmp-*")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_writer_that_dies_keeps_the_previous_file(tmp_path, exc):
    target = tmp_path / "record.json"
    write_json_atomic(target, {"result": 1})
    with pytest.raises(exc):
        with atomic_open(target, "w") as f:
            f.write('{"result": 2, "trunc')
            raise exc("killed mid-write")
    assert json.loads(target.read_text()) == {"result": 1}
    assert sorted(os.listdir(tmp_path)) == ["record.json"]
    with pytest.raises(TypeError):  # unserialisable payload: same guarantee
        write_json_atomic(target, {"result": object()})
    assert json.loads(target.read_text()) == {"result": 1}
    assert sorted(os.listdir(tmp_path)) == ["record.json"]


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the previous one afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path):
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_honour_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_text_atomic(tmp_path / "t.md", "x")
    write_json_atomic(tmp_path / "c.json", {})
    save_npy_atomic(tmp_path / "d.npy", np.zeros(2))
    torch_save_atomic({"w": torch.ones(1)}, tmp_path / "e.pth")
    copy_file_atomic(tmp_path / "c.json", tmp_path / "f.json")
    for name in ("t.md", "c.json", "d.npy", "e.pth", "f.json"):
        assert _mode(tmp_path / name) == expected, name


def test_overwriting_keeps_the_existing_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "record.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    write_json_atomic(target, {"result": 1})
    assert _mode(target) == 0o640
    torch_save_atomic({"w": torch.ones(1)}, tmp_path / "e.pth")
    os.chmod(tmp_path / "e.pth", 0o600)
    torch_save_atomic({"w": torch.zeros(1)}, tmp_path / "e.pth")
    assert _mode(tmp_path / "e.pth") == 0o600
    assert torch.equal(torch_load(str(tmp_path / "e.pth"))["w"], torch.zeros(1))
