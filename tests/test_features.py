"""Feature store: atomic save/load, validation errors, alignment to RecBole ids, user files."""

import builtins
import json
import os

import numpy as np
import pytest

from recbole_mm.data.features import (
    FeatureMatrix,
    FeatureStore,
    align_to_dataset,
    load_user_features,
    matrix_sha256,
)


def _matrix(n=5, d=4, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(dtype)


@pytest.fixture
def store(tmp_path):
    return FeatureStore(tmp_path, "toy")


def test_paths_and_roundtrip_mmap(store, tmp_path):
    npy, man = store.paths("text")
    assert npy == os.path.join(str(tmp_path), "toy.text.npy")
    assert man == os.path.join(str(tmp_path), "toy.text.json")
    tokens = ["a", "b", "c", "d", "e"]
    m = _matrix()
    m[2] = 0
    missing = np.array([False, False, True, False, False])
    store.save("text", tokens, m, missing, {"encoder": "enc", "type": "text", "input_checksum": "x"})
    fm = store.load("text")
    assert isinstance(fm, FeatureMatrix)
    assert isinstance(fm.matrix, np.memmap)  # memory-mapped by default
    assert fm.tokens == tokens
    np.testing.assert_array_equal(fm.missing, missing)
    np.testing.assert_array_equal(np.asarray(fm.matrix), m)
    man_d = json.load(open(man))
    for k in ("encoder", "type", "dim", "dtype", "n_items", "tokens", "missing", "format_version",
              "created", "input_checksum"):
        assert k in man_d
    assert man_d["missing"] == ["c"] and man_d["dim"] == 4 and man_d["n_items"] == 5
    fm2 = store.load("text", mmap=False)
    assert not isinstance(fm2.matrix, np.memmap)
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]  # no temporary leftovers


def test_float16_roundtrip(store):
    m = _matrix(dtype=np.float16)
    store.save("img", list("abcde"), m, None, {"encoder": "e"})
    fm = store.load("img")
    assert fm.matrix.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(fm.matrix), m)
    table, missing, _ = align_to_dataset(fm, np.array(["[PAD]", "e", "a"]))
    assert table.dtype == np.float32
    np.testing.assert_allclose(table[1], m[4].astype(np.float32))


def test_is_fresh(store):
    key = {"encoder": "enc", "fields": ["t", "g"], "template": None, "pooling": "mean", "input_checksum": "abc"}
    assert not store.is_fresh("text", key)  # nothing cached yet
    store.save("text", list("abcde"), _matrix(), None, dict(key))
    assert store.is_fresh("text", key)
    assert store.is_fresh("text", {"encoder": "enc"})  # a subset of the key fields is enough
    assert not store.is_fresh("text", dict(key, input_checksum="abd"))
    assert not store.is_fresh("text", dict(key, encoder="other"))
    assert not store.is_fresh("text", dict(key, fields=["t"]))
    assert not store.is_fresh("text", dict(key, template="{t}"))
    status = store.freshness("text", dict(key, template="{t}"))
    assert status.state == "stale" and status.changes == [("template", None, "{t}")]
    assert "template: None -> '{t}'" in status.describe()
    # items: a feature holding rows for more items than requested is fresh; one lacking some is not
    assert store.is_fresh("text", key, items=["b", "d"])
    status = store.freshness("text", key, items=["b", "x", "y"])
    assert status.state == "incomplete" and status.lacking == ["x", "y"] and not status.fresh
    assert "not for 2 of the 3 requested" in status.describe()
    assert store.freshness("text", dict(key, template="{t}"), items=["x"]).state == "stale"  # stale first
    # a matrix that disagrees with its manifest is an error, not "stale" (it would be overwritten)
    npy, _ = store.paths("text")
    np.save(npy, _matrix(n=4))
    with pytest.raises(ValueError, match="does not match its manifest"):
        store.is_fresh("text", key)


def test_nan_inf_rejected_on_save_naming_file_and_item(store):
    m = _matrix()
    m[3, 1] = np.nan
    m[4, 0] = np.inf
    with pytest.raises(ValueError) as e:
        store.save("text", ["i0", "i1", "i2", "i3", "i4"], m, None, {})
    msg = str(e.value)
    assert "toy.text.npy" in msg and "'i3'" in msg and "'i4'" in msg and "2 row(s)" in msg
    assert not os.path.exists(store.paths("text")[0])  # nothing written


def test_nan_rejected_on_load_naming_file_and_item(store):
    store.save("text", ["i0", "i1", "i2"], _matrix(n=3), None, {})
    npy, _ = store.paths("text")
    bad = _matrix(n=3)
    bad[1, 2] = -np.inf
    np.save(npy, bad)  # corrupted behind the store's back
    with pytest.raises(ValueError, match=r"toy\.text\.npy.*'i1'"):
        store.load("text")


def test_missing_file_error_says_how_to_extract(store):
    with pytest.raises(FileNotFoundError) as e:
        store.load("text")
    msg = str(e.value)
    assert "toy.text" in msg and "python -m recbole_mm.data.extract" in msg and "--name text" in msg


def test_duplicate_tokens_rejected(store):
    with pytest.raises(ValueError, match=r"duplicate item tokens \['b'\]"):
        store.save("text", ["a", "b", "b"], _matrix(n=3), None, {})
    # also when the manifest was edited by hand
    store.save("text", ["a", "b", "c"], _matrix(n=3), None, {})
    _, man = store.paths("text")
    d = json.load(open(man))
    d["tokens"] = ["a", "a", "c"]
    json.dump(d, open(man, "w"))
    with pytest.raises(ValueError, match="duplicate"):
        store.load("text")


def test_manifest_matrix_shape_mismatch(store):
    store.save("text", list("abc"), _matrix(n=3), None, {})
    npy, man = store.paths("text")
    np.save(npy, _matrix(n=4))
    with pytest.raises(ValueError, match=r"does not match its manifest"):
        store.load("text")
    with pytest.raises(ValueError, match="rows but 2 item tokens"):
        store.save("text", ["a", "b"], _matrix(n=3), None, {})


def test_interrupted_save_leaves_nothing_valid(store, monkeypatch):
    key = {"encoder": "enc", "input_checksum": "v1"}
    store.save("text", list("abc"), _matrix(n=3), None, dict(key))
    assert store.is_fresh("text", key)
    npy, man = store.paths("text")

    real_replace = os.replace

    def dying_replace(src, dst):
        if dst == man:  # killed right before the manifest lands
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        store.save("text", list("abcd"), _matrix(n=4, seed=1), None, dict(key, input_checksum="v2"))
    monkeypatch.setattr(os, "replace", real_replace)
    # the old manifest was removed before the new matrix landed: nothing looks valid
    assert not os.path.exists(man)
    assert not store.is_fresh("text", key)
    assert not store.is_fresh("text", dict(key, input_checksum="v2"))
    with pytest.raises(FileNotFoundError):
        store.load("text")


def test_align_extra_and_missing_tokens(store, caplog):
    tokens = ["10", "20", "30", "40", "99"]  # "99" unknown to the dataset
    m = _matrix(n=5)
    m[2] = 0
    store.save("text", tokens, m, np.array([False, False, True, False, False]), {})
    fm = store.load("text")
    id2token = np.array(["[PAD]", "40", "10", "30", "77", "20"])  # "77" has no feature, "30" no content
    with caplog.at_level("INFO"):
        table, missing, stats = align_to_dataset(fm, id2token, expected_dim=4)
    assert table.shape == (6, 4) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0)
    np.testing.assert_allclose(table[1], m[3])
    np.testing.assert_allclose(table[2], m[0])
    np.testing.assert_array_equal(table[3], 0)
    np.testing.assert_array_equal(table[4], 0)
    np.testing.assert_allclose(table[5], m[1])
    np.testing.assert_array_equal(missing, [True, False, False, True, True, False])
    assert stats["n_items"] == 5
    assert stats["covered"] == 3
    assert stats["missing_in_features"] == 2
    assert stats["absent_from_file"] == 1 and stats["no_content"] == 1
    assert stats["extra_tokens_in_features"] == 1
    assert "77" in caplog.text  # the absent item is named in the log


def test_align_wrong_dim_names_file_and_fix(store):
    store.save("text", list("ab"), _matrix(n=2, d=4), None, {})
    fm = store.load("text")
    with pytest.raises(ValueError) as e:
        align_to_dataset(fm, np.array(["[PAD]", "a"]), expected_dim=8)
    msg = str(e.value)
    assert "toy.text.npy" in msg and "dim 4" in msg and "expects 8" in msg and "Fix" in msg


def test_import_matrix_and_user_files(store, tmp_path):
    m = _matrix(n=3)
    m[1] = 0
    fm = store.import_matrix("clip", ["x", "y", "z"], m, source="my_clip_run")
    assert fm.manifest["source"] == "my_clip_run" and fm.manifest["type"] == "user"
    np.testing.assert_array_equal(fm.missing, [False, True, False])  # zero rows count as missing
    assert store.load("clip").tokens == ["x", "y", "z"]

    npy = tmp_path / "mine.npy"
    np.save(npy, m.astype(np.float16))
    (tmp_path / "mine.txt").write_text("x\ny\nz\n")
    (tmp_path / "mine.json").write_text(json.dumps(["x", "y", "z"]))
    for tokens_file in ("mine.txt", "mine.json"):
        u = load_user_features(npy, tmp_path / tokens_file)
        assert u.tokens == ["x", "y", "z"] and u.matrix.dtype == np.float16
        np.testing.assert_array_equal(u.missing, [False, True, False])
    table, missing, stats = align_to_dataset(u, np.array(["[PAD]", "z", "x", "q"]))
    assert stats["covered"] == 2 and stats["absent_from_file"] == 1 and stats["extra_tokens_in_features"] == 1
    np.testing.assert_allclose(table[1], m[2].astype(np.float16).astype(np.float32))

    (tmp_path / "short.txt").write_text("x\ny\n")
    with pytest.raises(ValueError, match="3 rows but"):
        load_user_features(npy, tmp_path / "short.txt")
    (tmp_path / "dup.txt").write_text("x\nx\nz\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_user_features(npy, tmp_path / "dup.txt")
    bad = m.copy()
    bad[2, 0] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"bad\.npy.*'z'"):
        load_user_features(tmp_path / "bad.npy", tmp_path / "mine.txt")


# ----------------------------------------------------------------------------- trustworthy files


@pytest.fixture
def make_read_only(monkeypatch):
    """``make_read_only(folder)`` makes ``folder`` unwritable: chmod 0o555 (restored at teardown),
    or -- as root, whom permissions do not stop -- every write into it (open for writing, os.open
    with write/create flags, mkdir, replace, rename, remove) raises PermissionError, as a
    read-only folder would."""
    chmodded = []

    def make(folder):
        folder = os.path.realpath(os.fspath(folder))
        if os.geteuid() != 0:
            os.chmod(folder, 0o555)
            chmodded.append(folder)
            return

        def inside(path):
            return not isinstance(path, int) and os.path.dirname(os.path.realpath(os.fspath(path))) == folder

        def deny(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))

        real_open, real_os_open = builtins.open, os.open

        def fake_open(file, mode="r", *a, **kw):
            if inside(file) and any(c in mode for c in "wax+"):
                deny(file)
            return real_open(file, mode, *a, **kw)

        def fake_os_open(path, flags, *a, **kw):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                deny(path)
            return real_os_open(path, flags, *a, **kw)

        def guard(real, last=False):
            def wrapped(*args, **kw):
                target = args[-1] if last else args[0]
                if inside(target):
                    deny(target)
                return real(*args, **kw)
            return wrapped

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        for fn, last in (("mkdir", False), ("replace", True), ("rename", True), ("remove", False),
                         ("unlink", False)):
            monkeypatch.setattr(os, fn, guard(getattr(os, fn), last))

    yield make
    for folder in chmodded:
        os.chmod(folder, 0o755)


def test_manifest_checksum_catches_reordered_rows(store):
    m = _matrix(n=4)
    store.save("text", list("abcd"), m, None, {"encoder": "enc", "input_checksum": "x"})
    npy, man = store.paths("text")
    assert json.load(open(man))["matrix_sha256"] == matrix_sha256(m)
    store.load("text")  # verified: fine
    np.save(npy, m[::-1].copy())  # same shape and dtype, rows reordered by hand
    for action in (lambda: store.load("text"), lambda: store.is_fresh("text", {"encoder": "enc"})):
        with pytest.raises(ValueError) as e:
            action()
        msg = str(e.value)
        assert "toy.text.npy" in msg and "toy.text.json" in msg and "checksum" in msg
        assert "import_matrix" in msg and "delete both files" in msg
    with pytest.raises(ValueError, match="checksum"):
        store.verify("text")


def test_manifest_dtype_mismatch_is_an_error(store):
    m = _matrix(n=3)
    store.save("text", list("abc"), m, None, {})
    npy, _ = store.paths("text")
    np.save(npy, m.astype(np.float16))  # same shape, other dtype
    with pytest.raises(ValueError, match=r"dtype: matrix float16, manifest float32"):
        store.load("text")


def test_old_manifest_without_checksum_is_accepted(store):
    m = _matrix(n=3)
    store.save("text", list("abc"), m, None, {"encoder": "enc"})
    _, man = store.paths("text")
    d = json.load(open(man))
    del d["matrix_sha256"]  # written before checksums existed
    json.dump(d, open(man, "w"))
    np.testing.assert_array_equal(np.asarray(store.load("text").matrix), m)
    assert store.is_fresh("text", {"encoder": "enc"})


def test_user_feature_is_not_overwritten_by_a_computed_one(store):
    mine = _matrix(n=3, seed=7)
    store.import_matrix("text", list("abc"), mine, source="my_run")
    with pytest.raises(ValueError) as e:
        store.save("text", list("abc"), _matrix(n=3), None, {"type": "text", "encoder": "enc"})
    msg = str(e.value)
    assert "imported by the user" in msg and "'my_run'" in msg and "FeatureStore.delete('text')" in msg
    np.testing.assert_array_equal(np.asarray(store.load("text").matrix), mine)
    assert store.freshness("text", {"encoder": "enc"}).state == "user"
    store.import_matrix("text", list("abc"), mine * 2, source="my_run_2")  # re-importing is fine
    store.save("text", list("abc"), _matrix(n=3), None, {"type": "text"}, replace_user=True)
    assert store.load("text").manifest["type"] == "text"


def test_build_lock_in_a_read_only_folder(tmp_path, make_read_only):
    store = FeatureStore(tmp_path, "toy")
    store.save("text", list("abc"), _matrix(n=3), None, {"encoder": "enc"})
    make_read_only(tmp_path)
    with store.build_lock("text"):  # no lock file can be created: proceeds without the lock
        fm = store.load("text")
    assert fm.tokens == list("abc")
    assert not os.path.exists(tmp_path / ".toy.text.lock")
    with pytest.raises(PermissionError) as e:
        store.check_writable("text")
    msg = str(e.value)
    assert str(tmp_path) in msg and "not writable" in msg and "data_path" in msg
