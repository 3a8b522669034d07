"""check_atomic_files: malformed atomic files give one clear DataFileError, valid files pass."""

import os
import pickle

import pytest

from recbole_mm.data import preflight
from recbole_mm.data.preflight import (
    ATOMIC_DOC, DataFileError, check_atomic_files, read_atomic_header,
)
from tests.conftest import write_tiny_dataset

ML100K = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "lib",
                      "python3.11", "site-packages", "recbole", "dataset_example", "ml-100k")

HEADER = "user_id:token\titem_id:token\ttimestamp:float"


def make(tmp_path, inter=None, item=None, name="d", raw=None, **config):
    """Write <tmp>/<name>/<name>.inter (+ .item); ``raw`` (bytes) overrides ``inter``."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    if raw is not None:
        (folder / f"{name}.inter").write_bytes(raw)
    elif inter is not None:
        (folder / f"{name}.inter").write_text(inter, encoding="utf-8")
    if item is not None:
        (folder / f"{name}.item").write_text(item, encoding="utf-8")
    cfg = {"data_path": str(folder), "dataset": name, "load_col": None}
    cfg.update(config)
    return cfg


def fail(cfg, *parts):
    with pytest.raises(DataFileError) as info:
        check_atomic_files(cfg)
    msg = str(info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in:\n{msg}"
    return info.value


ROWS = "u1\ti1\t1\nu1\ti2\t2\nu2\ti1\t3\n"


# ------------------------------------------------------------------ valid data passes

def test_tiny_dataset_passes(tmp_path):
    folder = write_tiny_dataset(tmp_path, "tiny")
    for load_col in (None, {"inter": ["user_id", "item_id", "timestamp"]},
                     {"inter": ["user_id", "item_id"], "item": ["item_id", "title"]}):
        cfg = {"data_path": folder, "dataset": "tiny", "load_col": load_col}
        checked = check_atomic_files(cfg)
        assert os.path.join(folder, "tiny.inter") in checked
        assert (os.path.join(folder, "tiny.item") in checked) == (load_col is None or "item" in load_col)


@pytest.mark.parametrize("load_col", [None, {"inter": ["user_id", "item_id", "rating", "timestamp"]}])
def test_recbole_ml100k_passes(load_col):
    cfg = {"data_path": ML100K, "dataset": "ml-100k", "load_col": load_col}
    checked = check_atomic_files(cfg)
    assert len(checked) == (3 if load_col is None else 1)


def test_empty_optional_values_pass(tmp_path):
    cfg = make(tmp_path, "user_id:token\titem_id:token\trating:float\tvec:float_seq\n"
               "u1\ti1\t\t\nu1\ti2\t4.5\t0.1 0.2\nu2\ti1\tNA\t1e-3  2\n\nu3\ti3\tnan\t\n")
    assert check_atomic_files(cfg)


def test_real_recbole_config_passes(tmp_path, workdir):
    from recbole.config import Config

    write_tiny_dataset(tmp_path / "data", "tiny")
    config = Config(model="SASRec", dataset="tiny", config_dict={
        "data_path": str(tmp_path / "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "use_gpu": False, "show_progress": False, "train_neg_sample_args": None})
    assert check_atomic_files(config) == [str(tmp_path / "data" / "tiny" / "tiny.inter")]


def test_benchmark_files(tmp_path):
    cfg = make(tmp_path, benchmark_filename=["train", "valid", "test"])
    folder = tmp_path / "d"
    for part in ("train", "valid"):
        (folder / f"d.{part}.inter").write_text(HEADER + "\n" + ROWS)
    fail(cfg, "d.test.inter", "does not exist", "benchmark_filename")
    (folder / "d.test.inter").write_text(HEADER + "\n" + ROWS)
    assert len(check_atomic_files(cfg)) == 3


def test_quoted_values_follow_recbole(tmp_path):
    # a quoted value may hold a tab; the row still has three fields for pandas' parser
    cfg = make(tmp_path, HEADER + '\nu1\t"i\t1"\t1\nu2\ti2\t2\n')
    assert check_atomic_files(cfg)
    cfg = make(tmp_path, HEADER + '\nu1\t"i1\t1\nu2\ti2\t2\n', name="e")
    assert fail(cfg, "e.inter", "line 2", "never closed", "double quotes").line == 2
    # with quotes in the file, float values are checked with RecBole's own (python) parser
    cfg = make(tmp_path, HEADER + '\nu1\t"i\n1"\t1\n\nu2\ti2\tx\n', name="f")
    assert fail(cfg, "f.inter", "line 5", "'x'").line == 5


# ------------------------------------------------------------------ missing files

def test_missing_folder(tmp_path):
    cfg = {"data_path": str(tmp_path / "nope"), "dataset": "nope"}
    fail(cfg, str(tmp_path / "nope"), "does not exist", "data_path", ATOMIC_DOC)


def test_missing_inter(tmp_path):
    cfg = make(tmp_path, item="item_id:token\ni1\n")
    fail(cfg, os.path.join(str(tmp_path / "d"), "d.inter"), "does not exist", "data_path", "d.item",
         ATOMIC_DOC)


# ------------------------------------------------------------------ header problems

def test_header_without_types(tmp_path):
    e = fail(make(tmp_path, "user_id\titem_id\nu1\ti1\n"), "d.inter", "line 1", "user_id", ":type")
    assert e.line == 1 and e.column == "user_id"


def test_item_header_without_types(tmp_path):
    cfg = make(tmp_path, HEADER + "\n" + ROWS, item="item_id\ttitle\ni1\tx\n")
    fail(cfg, "d.item", "line 1", "item_id", ":type")


def test_untyped_extra_column(tmp_path):
    cfg = make(tmp_path, HEADER + "\trating\n" + "u1\ti1\t1\t5\n",
               load_col={"inter": ["user_id", "item_id"]})
    e = fail(cfg, "d.inter", "header field 4", "'rating'", "no ':type'")
    assert e.column == "rating"


def test_unknown_type(tmp_path):
    e = fail(make(tmp_path, "user_id:str\titem_id:token\nu1\ti1\n"),
             "d.inter", "line 1", "user_id", "unknown type 'str'", "'token'")
    assert e.column == "user_id"


def test_two_colons(tmp_path):
    fail(make(tmp_path, "user_id:token:x\titem_id:token\nu1\ti1\n"), "d.inter", "more than one ':'")


def test_comma_separated(tmp_path):
    fail(make(tmp_path, "user_id:token,item_id:token,timestamp:float\nu1,i1,1\n"),
         "d.inter", "line 1", "comma-separated", "tab", "field_separator")


def test_bom(tmp_path):
    fail(make(tmp_path, raw=b"\xef\xbb\xbf" + (HEADER + "\n" + ROWS).encode()), "d.inter", "BOM",
         "utf-8-sig")
    # with encoding utf-8-sig RecBole (open + pandas) strips it
    cfg = make(tmp_path, raw=b"\xef\xbb\xbf" + (HEADER + "\n" + ROWS).encode(), name="b",
               encoding="utf-8-sig")
    assert check_atomic_files(cfg)


# ------------------------------------------------------------------ id and load_col columns

def test_user_id_missing_from_inter(tmp_path):
    e = fail(make(tmp_path, "uid:token\titem_id:token\nu1\ti1\n"),
             "d.inter", "'user_id'", "USER_ID_FIELD", "'uid'")
    assert e.column == "user_id"


def test_item_id_missing_from_inter(tmp_path):
    cfg = make(tmp_path, HEADER + "\n" + ROWS, ITEM_ID_FIELD="movie_id")
    fail(cfg, "d.inter", "'movie_id'", "ITEM_ID_FIELD")


def test_item_id_missing_from_item(tmp_path):
    cfg = make(tmp_path, HEADER + "\n" + ROWS, item="iid:token\ttitle:token_seq\ni1\tx y\n")
    fail(cfg, "d.item", "'item_id'", "ITEM_ID_FIELD")
    # .item is not opened when load_col has no 'item' entry (RecBole skips it too)
    cfg["load_col"] = {"inter": ["user_id", "item_id"]}
    assert check_atomic_files(cfg) == [str(tmp_path / "d" / "d.inter")]


def test_id_not_loaded(tmp_path):
    cfg = make(tmp_path, HEADER + "\n" + ROWS, load_col={"inter": ["item_id", "timestamp"]})
    fail(cfg, "d.inter", "'user_id'", "not loaded", "load_col['inter']")


def test_load_col_column_missing(tmp_path):
    cfg = make(tmp_path, HEADER + "\n" + ROWS, load_col={"inter": ["user_id", "item_id", "rating"]})
    e = fail(cfg, "d.inter", "'rating'", "load_col['inter']", "'timestamp'")
    assert e.column == "rating"


# ------------------------------------------------------------------ empty files

def test_empty_file(tmp_path):
    fail(make(tmp_path, raw=b""), "d.inter", "empty (0 bytes)", "line 1")


def test_empty_item_file(tmp_path):
    fail(make(tmp_path, HEADER + "\n" + ROWS, item=""), "d.item", "empty (0 bytes)")


def test_header_only(tmp_path):
    fail(make(tmp_path, HEADER + "\n"), "d.inter", "no data rows", "line 2")
    fail(make(tmp_path, HEADER + "\n\n\n", name="e"), "e.inter", "no data rows")


# ------------------------------------------------------------------ values

def test_non_numeric_float(tmp_path):
    rows = "".join(f"u{i}\ti{i}\t{i}\n" for i in range(10)) + "u10\ti10\tabc\n"
    e = fail(make(tmp_path, HEADER + "\n" + rows), "d.inter", "line 12", "'timestamp'", "'abc'",
             "float", "token")
    assert e.line == 12 and e.column == "timestamp"


def test_non_numeric_float_line_after_blank_lines_and_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "_CHUNK_ROWS", 3)
    monkeypatch.setattr(preflight, "_CHUNK_BYTES", 16)
    rows = "u1\ti1\t1\n\nu2\ti2\t2\nu3\ti3\t3\nu4\ti4\t4\nu5\ti5\t1,5\n"
    e = fail(make(tmp_path, HEADER + "\n" + rows), "d.inter", "line 7", "'1,5'")
    assert e.line == 7


def test_non_numeric_float_seq(tmp_path):
    cfg = make(tmp_path, HEADER + "\n" + ROWS,
               item="item_id:token\tvec:float_seq\ni1\t0.1 0.2\ni2\t0.3 x4\n")
    e = fail(cfg, "d.item", "line 3", "'vec'", "'x4'", "float_seq")
    assert e.line == 3


def test_non_utf8(tmp_path):
    raw = (HEADER + "\nu1\ti1\t1\n").encode() + "u2\tcaf\xe9\t2\n".encode("latin-1")
    e = fail(make(tmp_path, raw=raw), "d.inter", "line 3", "byte 7", "utf-8", "encoding", "latin-1")
    assert e.line == 3
    # the same file with `encoding: latin-1` is fine
    assert check_atomic_files(make(tmp_path, raw=raw, name="l", encoding="latin-1"))


def test_non_utf8_in_header(tmp_path):
    raw = "user_id:token\titem_\xe9:token\nu1\ti1\n".encode("latin-1")
    fail(make(tmp_path, raw=raw, load_col={"inter": ["user_id"]}), "d.inter", "line 1", "utf-8")


@pytest.mark.parametrize("row,detail", [("u9\ti9\n", "2 fields"), ("u9\ti9\t9\t\n", "trailing separator"),
                                        ("u9 i9 9\n", "space-separated")])
def test_field_count(tmp_path, row, detail):
    e = fail(make(tmp_path, HEADER + "\n" + ROWS + row + ROWS), "d.inter", "line 5",
             "header has 3", detail)
    assert e.line == 5


def test_field_count_multichar_separator(tmp_path):
    text = "user_id:token::item_id:token\nu1::i1\nu2::i2::x\n"
    fail(make(tmp_path, text, field_separator="::"), "d.inter", "line 3", "3 fields")


# ------------------------------------------------------------------ helper API

def test_read_atomic_header(tmp_path):
    p = tmp_path / "x.inter"
    p.write_text("a:token\tb:float_seq\r\n1\t2\r\n")
    assert read_atomic_header(str(p), "\t", None) == [("a", "token"), ("b", "float_seq")]


def test_error_is_value_error_and_picklable(tmp_path):
    e = fail(make(tmp_path, "user_id:str\titem_id:token\nu1\ti1\n"))
    assert isinstance(e, ValueError)
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.line == 1
