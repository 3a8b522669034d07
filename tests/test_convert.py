"""Tests of recbole_mm.data.convert: hand-written fixtures in every source
format (built in tmp_path), RecBole loading of the converted files, and the
real NineRec Bili_Food data when it is available."""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    from recbole_mm.data import convert as cv
except ImportError:  # source checkout without pip install
    sys.path.insert(0, str(REPO))
    from recbole_mm.data import convert as cv


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def read_rows(path: Path):
    """(header, rows) of an atomic file, parsed the way RecBole parses it."""
    df = cv.read_atomic(path)
    header = [f"{c}:{t}" for c, t in df.attrs["field_types"].items()]
    return header, [tuple(r) for r in df.itertuples(index=False)]


def no_tmp_files(folder: Path) -> bool:
    return not any(p.name.endswith(".tmp") or p.name.startswith(".tmp-") for p in folder.rglob("*"))


def write_lines(path: Path, lines, encoding="utf-8", gz=False):
    data = "".join(line + "\n" for line in lines).encode(encoding)
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------
# NineRec
# ----------------------------------------------------------------------------

NINEREC_SEQ = [
    "0 0 1 2 3 4 ",
    "1 2 3 7 5",        # item 7 has no row in the csv
    "",
    "2 1 4 0 2 5 3 6",
    "3 5 6",            # fewer than 3 items: skipped
]
NINEREC_CSV = (
    '0,番茄炒蛋,Tomato scrambled eggs\n'
    '1,"""引号""开头","""Quoted"" start, with comma"\n'
    '2,"多行\n标题","Title\twith tab"\n'
    '3,空,\n'
    '4,a,b c\n'
    '5,b,b\n'
    '6,c,c\n'
)


def make_ninerec(root: Path, name="Bili_Tiny", covers=True) -> Path:
    src = root / "raw" / name
    src.mkdir(parents=True)
    write_lines(src / "sequential_data.txt", NINEREC_SEQ)
    (src / f"{name}_item.csv").write_text(NINEREC_CSV, encoding="utf-8")
    if covers:
        (src / f"{name}_cover").mkdir()
        for stem in ("0", "1", "99"):
            (src / f"{name}_cover" / f"{stem}.jpg").write_bytes(b"\xff\xd8")
    return src


def test_ninerec_outputs(tmp_path, caplog):
    src = make_ninerec(tmp_path)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger=cv.__name__):
        s = cv.convert_ninerec(src, out)
    assert s["name"] == "Bili_Tiny"
    assert (s["users"], s["items"], s["interactions"]) == (3, 8, 16)
    assert (s["train_rows"], s["valid_rows"], s["test_rows"]) == (7, 3, 3)
    assert s["skipped_users"] == 1 and s["items_missing_in_csv"] == 1
    assert s["users_with_3_items"] == 0
    assert s["cover_images"] == 2 and s["item_rows"] == 8
    assert "fewer than 3" in caplog.text and "item 7" in caplog.text

    d = out / "Bili_Tiny"
    assert sorted(p.name for p in d.iterdir()) == [
        "Bili_Tiny.inter", "Bili_Tiny.item", "Bili_Tiny.test.inter",
        "Bili_Tiny.train.inter", "Bili_Tiny.valid.inter"]
    header, rows = read_rows(d / "Bili_Tiny.inter")
    assert header == ["user_id:token", "item_id:token", "timestamp:float"]
    assert rows[:6] == [("0", "0", "0"), ("0", "1", "1"), ("0", "2", "2"),
                        ("0", "3", "3"), ("0", "4", "4"), ("1", "2", "0")]
    assert len(rows) == 16 and rows[-1] == ("2", "6", "6")

    header, rows = read_rows(d / "Bili_Tiny.item")
    assert header == ["item_id:token", "title:token_seq", "title_en:token_seq"]
    items = {r[0]: r[1:] for r in rows}
    assert items["0"] == ("番茄炒蛋", "Tomato scrambled eggs")
    assert items["1"] == ('"引号"开头', '"Quoted" start, with comma')
    assert items["2"] == ("多行 标题", "Title with tab")
    assert items["3"] == ("空", "")
    assert items["7"] == ("", "")
    raw = (d / "Bili_Tiny.item").read_text(encoding="utf-8")
    assert raw.count("\n") == 9  # header + 8 rows: no embedded line breaks

    header, train = read_rows(d / "Bili_Tiny.train.inter")
    assert header == ["user_id:token", "item_id_list:token_seq", "item_id:token"]
    assert train == [("0", "0", "1"), ("0", "0 1", "2"), ("1", "2", "3"),
                     ("2", "1", "4"), ("2", "1 4", "0"), ("2", "1 4 0", "2"),
                     ("2", "1 4 0 2", "5")]
    assert read_rows(d / "Bili_Tiny.valid.inter")[1] == [
        ("0", "0 1 2", "3"), ("1", "2 3", "7"), ("2", "1 4 0 2 5", "3")]
    assert read_rows(d / "Bili_Tiny.test.inter")[1] == [
        ("0", "0 1 2 3", "4"), ("1", "2 3 7", "5"), ("2", "1 4 0 2 5 3", "6")]
    assert no_tmp_files(out)


def test_ninerec_max_history_and_no_benchmark(tmp_path):
    src = make_ninerec(tmp_path, covers=False)
    s = cv.convert_ninerec(src, tmp_path / "o1", name="Bili_Tiny", max_history=2)
    d = tmp_path / "o1" / "Bili_Tiny"
    train = [r for r in read_rows(d / "Bili_Tiny.train.inter")[1] if r[0] == "2"]
    assert train == [("2", "1", "4"), ("2", "1 4", "0"), ("2", "4 0", "2"),
                     ("2", "0 2", "5")]
    assert read_rows(d / "Bili_Tiny.valid.inter")[1][2] == ("2", "2 5", "3")
    assert read_rows(d / "Bili_Tiny.test.inter")[1][2] == ("2", "5 3", "6")
    assert s["cover_images"] is None

    s = cv.convert_ninerec(src, tmp_path / "o2", benchmark=False)
    assert s["train_rows"] is None
    assert sorted(p.name for p in (tmp_path / "o2" / "Bili_Tiny").iterdir()) == [
        "Bili_Tiny.inter", "Bili_Tiny.item"]


def test_ninerec_input_errors(tmp_path):
    src = make_ninerec(tmp_path, covers=False)
    (src / "Bili_Tiny_item.csv").rename(src / "x.csv")
    with pytest.raises(FileNotFoundError, match="Bili_Tiny_item.csv.*item_id,chinese"):
        cv.convert_ninerec(src, tmp_path / "o")
    (src / "x.csv").rename(src / "Bili_Tiny_item.csv")

    with pytest.raises(FileNotFoundError, match="sequential_data.txt"):
        cv.convert_ninerec(tmp_path / "raw" / "nope", tmp_path / "o")

    write_lines(src / "sequential_data.txt", ["0 1 2 3", "1 2 x 4"])
    with pytest.raises(ValueError, match=r"sequential_data.txt:2: non-integer"):
        cv.convert_ninerec(src, tmp_path / "o")

    write_lines(src / "sequential_data.txt", ["0 1 2 3", "0 2 3 4"])
    with pytest.raises(ValueError, match="user id 0"):
        cv.convert_ninerec(src, tmp_path / "o")

    write_lines(src / "sequential_data.txt", ["0 1 2 3"])
    (src / "Bili_Tiny_item.csv").write_text("0,a,b\n1,c,d\n0,e,f\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Bili_Tiny_item.csv:3: duplicate item id 0"):
        cv.convert_ninerec(src, tmp_path / "o")
    assert not (tmp_path / "o" / "Bili_Tiny" / "Bili_Tiny.inter").exists()


def test_ninerec_three_item_users_are_flagged(tmp_path, caplog):
    # RecBole's LS split would give such users no validation sample
    src = make_ninerec(tmp_path, covers=False)
    write_lines(src / "sequential_data.txt", ["0 1 2 3", "1 0 1 2 3"])
    with caplog.at_level(logging.WARNING, logger=cv.__name__):
        s = cv.convert_ninerec(src, tmp_path / "o")
    assert s["users_with_3_items"] == 1
    assert (s["train_rows"], s["valid_rows"], s["test_rows"]) == (1, 2, 2)
    assert "exactly 3 items" in caplog.text


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.inter"
    target.write_text("old\n")

    def rows():
        yield ("1", "2", "3")
        raise KeyboardInterrupt  # simulated kill in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        cv._write_rows(target, cv.INTER_HEADER, rows())
    assert target.read_text() == "old\n"
    assert no_tmp_files(tmp_path)


# ----------------------------------------------------------------------------
# Amazon
# ----------------------------------------------------------------------------


def r18(user, item, t, rating=5.0):
    return json.dumps({"overall": rating, "verified": True, "reviewerID": user,
                       "asin": item, "unixReviewTime": t, "reviewText": "x"})


def test_amazon_2018_kcore_and_text(tmp_path, caplog):
    reviews = write_lines(tmp_path / "Beauty.json", [
        r18("u1", "A", 10), r18("u1", "B", 20), r18("u1", "C", 30),
        r18("u2", "A", 11), r18("u2", "B", 21),
        r18("u3", "A", 12), r18("u3", "C", 32),
        r18("u3", "A", 12),                       # exact duplicate
        '{"overall": 5.0, "reviewerID": "u9", "as',  # truncated line
        "",
        r18("u4", "D", 40),                       # u4 < 2 -> removed
        r18("u5", "D", 41), r18("u5", "E", 42),   # then D, E < 2 -> u5 < 2
        r18("u6", "E", 50),                       # u6 < 2 -> removed
    ])
    meta = write_lines(tmp_path / "meta_Beauty.json.gz", [
        json.dumps({"asin": "A", "title": "<b>Nice</b> &amp; clean\tshampoo",
                    "description": ["<p>Line one</p>", "Line\n  two &lt;3"],
                    "category": ["Beauty", "Hair Care", "</span>"],
                    "imageURL": ["http://x/a_small.jpg"],
                    "imageURLHighRes": ["http://x/a.jpg"]}),
        json.dumps({"asin": "D", "title": "not kept"}),
        "{broken",
        json.dumps({"asin": "B", "title": "Bee", "description": "plain text",
                    "category": [], "imageURL": []}),
        json.dumps({"asin": "A", "title": "duplicate record ignored"}),
    ], gz=True)
    images = tmp_path / "img"
    images.mkdir()
    for f in ("A.jpg", "D.png", "notes.txt"):
        (images / f).write_bytes(b"x")

    with caplog.at_level(logging.WARNING, logger=cv.__name__):
        s = cv.convert_amazon(reviews, meta, tmp_path / "out", "Amazon_Tiny",
                              kcore=2, image_dir=images)
    assert s["format"] == "2018"
    assert (s["users"], s["items"], s["interactions"]) == (3, 3, 7)
    assert s["raw_interactions"] == 12 and s["duplicates_removed"] == 1
    assert s["malformed_lines"] == 2
    assert "Beauty.json:9: malformed JSON" in caplog.text
    assert s["items_without_meta"] == 1 and s["items_with_image_url"] == 1
    assert s["local_images"] == 1

    d = tmp_path / "out" / "Amazon_Tiny"
    header, rows = read_rows(d / "Amazon_Tiny.inter")
    assert header == ["user_id:token", "item_id:token", "timestamp:float"]
    assert rows == [("u1", "A", "10"), ("u1", "B", "20"), ("u1", "C", "30"),
                    ("u2", "A", "11"), ("u2", "B", "21"),
                    ("u3", "A", "12"), ("u3", "C", "32")]
    header, rows = read_rows(d / "Amazon_Tiny.item")
    assert header == ["item_id:token", "title:token_seq", "description:token_seq",
                      "categories:token_seq", "image_url:token"]
    assert rows == [
        ("A", "Nice & clean shampoo", "Line one Line two <3", "Beauty Hair Care",
         "http://x/a.jpg"),
        ("B", "Bee", "plain text", "", ""),
        ("C", "", "", "", ""),
    ]
    assert no_tmp_files(tmp_path)


def r23(user, item, t_ms, asin=None):
    rec = {"rating": 4.0, "title": "t", "text": "x", "images": [], "user_id": user,
           "timestamp": t_ms, "helpful_vote": 0, "verified_purchase": True}
    rec["asin"] = asin or item
    if item is not None:
        rec["parent_asin"] = item
    return json.dumps(rec)


def test_amazon_2023_gz(tmp_path):
    reviews = write_lines(tmp_path / "All_Beauty.jsonl.gz", [
        r23("U1", "P1", 1600000000000, asin="X1"),
        r23("U1", "P2", 1600000001000),
        r23("U1", "P1", 1600000002500, asin="X2"),  # another variant, same parent
        r23("U2", "P1", 1600000000000),
        r23("U2", "P2", 1600000005000),
        r23("U3", None, 1600000009000, asin="P3"),  # no parent_asin: asin used
    ], gz=True)
    meta = write_lines(tmp_path / "meta_All_Beauty.jsonl", [
        json.dumps({"main_category": "All Beauty", "title": "Tab\there",
                    "description": [], "categories": [], "parent_asin": "P1",
                    "images": [{"thumb": "T1", "large": "L1", "variant": "PT01",
                                "hi_res": None},
                               {"thumb": "T2", "large": "L2", "variant": "MAIN",
                                "hi_res": "H2"}]}),
        json.dumps({"main_category": "All Beauty", "title": "Two",
                    "description": ["a", "<br/>b"],
                    "categories": ["Beauty & Personal Care", "Hair Care"],
                    "parent_asin": "P2",
                    "images": [{"thumb": "T3", "large": "L3", "variant": "MAIN",
                                "hi_res": None}]}),
    ])
    s = cv.convert_amazon(reviews, meta, tmp_path / "out", "Amz23", kcore=2)
    assert s["format"] == "2023" and s["local_images"] is None
    assert (s["users"], s["items"], s["interactions"]) == (2, 2, 5)
    d = tmp_path / "out" / "Amz23"
    assert read_rows(d / "Amz23.inter")[1] == [
        ("U1", "P1", "1600000000"), ("U1", "P2", "1600000001"),
        ("U1", "P1", "1600000002.5"),
        ("U2", "P1", "1600000000"), ("U2", "P2", "1600000005")]
    assert read_rows(d / "Amz23.item")[1] == [
        ("P1", "Tab here", "", "All Beauty", "H2"),
        ("P2", "Two", "a b", "Beauty & Personal Care Hair Care", "L3")]

    # kcore=3 empties the 2-user data set: still valid files with headers only
    s = cv.convert_amazon(reviews, meta, tmp_path / "out", "Amz23_k3", kcore=3)
    assert s["interactions"] == 0 and s["items"] == 0


def test_amazon_errors(tmp_path):
    meta = write_lines(tmp_path / "meta.json", [json.dumps({"asin": "A"})])
    bad = write_lines(tmp_path / "r.json", [r18("u1", "A", 1),
                                            json.dumps({"reviewerID": "u2", "asin": "A"})])
    with pytest.raises(ValueError, match=r"r.json:2: missing key 'unixReviewTime'"):
        cv.convert_amazon(bad, meta, tmp_path / "o", "X")
    unknown = write_lines(tmp_path / "u.json", [json.dumps({"uid": 1, "item": 2})])
    with pytest.raises(ValueError, match="2018 format.*2023 format"):
        cv.convert_amazon(unknown, meta, tmp_path / "o", "X")
    good = write_lines(tmp_path / "g.json", [r18("u1", "A", 1)])
    bad_meta = write_lines(tmp_path / "m.json", [json.dumps({"title": "no id"})])
    with pytest.raises(ValueError, match="m.json:1.*'asin' or 'parent_asin'"):
        cv.convert_amazon(good, bad_meta, tmp_path / "o", "X", kcore=1)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        cv.convert_amazon(tmp_path / "missing.json", meta, tmp_path / "o", "X")


# ----------------------------------------------------------------------------
# MovieLens
# ----------------------------------------------------------------------------

ML_ITEM_HEADER = ["item_id:token", "movie_title:token_seq", "release_year:token",
                  "class:token_seq"]
ML_INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]


def flags(*idx):
    return "|".join("1" if i in idx else "0" for i in range(19))


def test_movielens_100k(tmp_path):
    src = tmp_path / "ml-100k"
    src.mkdir()
    write_lines(src / "u.data", ["2\t10\t5\t881250940", "1\t20\t3\t881250950",
                                 "1\t10\t4\t881250949", "2\tx\t3\t1"])
    write_lines(src / "u.item", [
        f"10|Café Society (1995)|01-Jan-1995||http://imdb|{flags(3, 4, 5)}",
        f"20|Usual Suspects, The (1995)|14-Aug-1995||http://imdb|{flags(6, 16)}",
        f"30|Unrated (1990)|01-Jan-1990||http://imdb|{flags(0)}",
    ], encoding="latin-1")
    write_lines(src / "u.genre", [f"{g}|{i}" for i, g in enumerate(cv.ML100K_GENRES)])
    s = cv.convert_movielens(src, tmp_path / "out", "ml-tiny")
    assert s["layout"] == "ml-100k" and s["malformed_lines"] == 1
    assert (s["users"], s["items"], s["interactions"]) == (2, 2, 3)
    assert s["unrated_movies_dropped"] == 1
    d = tmp_path / "out" / "ml-tiny"
    header, rows = read_rows(d / "ml-tiny.inter")
    assert header == ML_INTER_HEADER
    assert rows == [("1", "10", "4", "881250949"), ("1", "20", "3", "881250950"),
                    ("2", "10", "5", "881250940")]
    header, rows = read_rows(d / "ml-tiny.item")
    assert header == ML_ITEM_HEADER
    assert rows == [("10", "Café Society", "1995", "Animation Children's Comedy"),
                    ("20", "Usual Suspects, The", "1995", "Crime Thriller")]
    # same columns as RecBole's shipped ml-100k.item
    import recbole
    shipped = Path(recbole.__file__).parent / "dataset_example/ml-100k/ml-100k.item"
    if shipped.is_file():
        assert shipped.read_text(encoding="utf-8").split("\n", 1)[0].split("\t") \
            == ML_ITEM_HEADER


def test_movielens_1m(tmp_path):
    src = tmp_path / "ml-1m"
    src.mkdir()
    write_lines(src / "ratings.dat", ["1::1193::5::978300760", "1::2::3::978302109",
                                      "2::1193::4::978298413"])
    write_lines(src / "movies.dat", [
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
        "2::Jumanji (1995)::Adventure|Children's|Fantasy",
        "3::Señor Unrated (1995)::Comedy"], encoding="latin-1")
    s = cv.convert_movielens(src, tmp_path / "out", "ml-1m")
    assert s["layout"] == "ml-1m"
    assert (s["users"], s["items"], s["interactions"]) == (2, 2, 3)
    d = tmp_path / "out" / "ml-1m"
    assert read_rows(d / "ml-1m.inter")[1] == [
        ("1", "1193", "5", "978300760"), ("1", "2", "3", "978302109"),
        ("2", "1193", "4", "978298413")]
    assert read_rows(d / "ml-1m.item")[1] == [
        ("2", "Jumanji", "1995", "Adventure Children's Fantasy"),
        ("1193", "One Flew Over the Cuckoo's Nest", "1975", "Drama")]


def test_movielens_latest_and_missing(tmp_path):
    src = tmp_path / "ml-latest-small"
    src.mkdir()
    write_lines(src / "ratings.csv", ["userId,movieId,rating,timestamp",
                                      "1,11,3.5,964982703", "1,7,4.0,964981247",
                                      "10,11,2.5,1000", "2,99,1.0,5"])
    write_lines(src / "movies.csv", [
        "movieId,title,genres",
        '11,"American President, The (1995)",Comedy|Drama|Romance',
        "7,Babylon 5 (1994-1998) ,Sci-Fi",
        "8,No Year Movie,(no genres listed)",
    ])
    s = cv.convert_movielens(src, tmp_path / "out", "ml-latest-small")
    assert s["layout"] == "ml-latest" and s["rated_movies_without_row"] == 1
    assert (s["users"], s["items"], s["interactions"]) == (3, 3, 4)
    d = tmp_path / "out" / "ml-latest-small"
    assert read_rows(d / "ml-latest-small.inter")[1] == [
        ("1", "7", "4", "964981247"), ("1", "11", "3.5", "964982703"),
        ("2", "99", "1", "5"), ("10", "11", "2.5", "1000")]
    assert read_rows(d / "ml-latest-small.item")[1] == [
        ("7", "Babylon 5", "1994", "Sci-Fi"),
        ("11", "American President, The", "1995", "Comedy Drama Romance"),
        ("99", "", "", "")]
    assert cv._split_title("No Year Movie") == ("No Year Movie", "")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="u.data, ratings.dat or ratings.csv"):
        cv.convert_movielens(empty, tmp_path / "out", "x")
    (empty / "ratings.dat").write_text("1::2::3::4\n")
    with pytest.raises(FileNotFoundError, match="movies.dat"):
        cv.convert_movielens(empty, tmp_path / "out", "x")


# ----------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------


def test_cli(tmp_path, capsys):
    src = make_ninerec(tmp_path, covers=False)
    assert cv.main(["ninerec", "--src", str(src), "--out", str(tmp_path / "o"),
                    "-q", "--max-history", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test_rows"] == 3
    assert (tmp_path / "o" / "Bili_Tiny" / "Bili_Tiny.test.inter").is_file()
    assert cv.main(["movielens", "--src", str(tmp_path / "nope"), "--name", "x",
                    "--out", str(tmp_path / "o"), "-q"]) == 1
    with pytest.raises(SystemExit):
        cv.main(["amazon", "--reviews", "r.json"])  # --meta etc. missing


# ----------------------------------------------------------------------------
# loading through RecBole
# ----------------------------------------------------------------------------


def _recbole():
    try:
        import recbole_mm.compat  # noqa: F401  (numpy 2 aliases for RecBole)
    except Exception:
        import numpy as np
        for alias, value in (("float_", np.float64), ("complex_", np.complex128),
                             ("unicode_", np.str_)):
            if alias not in np.__dict__:
                setattr(np, alias, value)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    return Config, create_dataset, data_preparation


BASE_CONFIG = {
    "train_neg_sample_args": None, "loss_type": "CE", "MAX_ITEM_LIST_LENGTH": 50,
    "show_progress": False, "state": "ERROR", "use_gpu": False, "seed": 1,
}
DATASET_YAML = REPO / "properties" / "dataset" / "Bili_Food.yaml"


def _samples(dataset):
    """{(user, history, target)} of a RecBole sequential dataset, as raw tokens."""
    feat = dataset.inter_feat
    out = set()
    for u, hist, n, t in zip(feat["user_id"].tolist(), feat["item_id_list"].tolist(),
                             feat["item_length"].tolist(), feat["item_id"].tolist()):
        out.add((dataset.id2token("user_id", u),
                 " ".join(dataset.id2token("item_id", hist[:n])),
                 dataset.id2token("item_id", t)))
    return out


def _build(data_path, name, extra, config_files=None):
    Config, create_dataset, data_preparation = _recbole()
    config = Config(model="SASRec", dataset=name, config_file_list=config_files,
                    config_dict={"data_path": str(data_path), **BASE_CONFIG, **extra})
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, [train.dataset, valid.dataset, test.dataset]


def test_recbole_loads_both_variants(tmp_path, monkeypatch):
    src = make_ninerec(tmp_path)
    out = tmp_path / "data"
    s = cv.convert_ninerec(src, out)
    monkeypatch.chdir(tmp_path)  # RecBole writes log/ and log_tensorboard/ to cwd
    monkeypatch.setattr(sys, "argv", ["pytest"])  # RecBole's Config parses sys.argv

    # 1) the dataset yaml shipped with the plugin: .inter + RecBole's LS split
    config, parts = _build(out, "Bili_Tiny", {}, [str(DATASET_YAML)])
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert config["eval_args"]["order"] == "TO"
    assert config["valid_metric"] == "Hit@10"
    assert config["mm_features"]["text"] == {
        "type": "text", "fields": ["title_en"], "template": "{title_en}"}
    assert [len(p) for p in parts] == [s["train_rows"], s["valid_rows"], s["test_rows"]]
    via_inter = [_samples(p) for p in parts]

    # 2) the benchmark files written by the converter
    config, parts = _build(out, "Bili_Tiny", {
        "benchmark_filename": ["train", "valid", "test"],
        "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
    })
    assert [len(p) for p in parts] == [7, 3, 3]
    via_benchmark = [_samples(p) for p in parts]
    assert via_inter == via_benchmark
    assert ("2", "1 4 0 2 5 3", "6") in via_benchmark[2]


# ----------------------------------------------------------------------------
# real NineRec data (never copied into the repository)
# ----------------------------------------------------------------------------


def _ninerec_root() -> Path:
    env = os.environ.get("RECBOLE_MM_NINEREC_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "ninerec_bili"


def test_real_bili_food(tmp_path):
    src = _ninerec_root() / "Bili_Food"
    if not (src / "sequential_data.txt").is_file():
        pytest.skip(f"NineRec data {src} not found: set RECBOLE_MM_NINEREC_DIR")
    s = cv.convert_ninerec(src, tmp_path)
    assert (s["users"], s["items"], s["interactions"]) == (6549, 1579, 39740)
    assert (s["train_rows"], s["valid_rows"], s["test_rows"]) == (20093, 6549, 6549)
    assert s["skipped_users"] == 0 and s["items_missing_in_csv"] == 0
    # titles survive the round trip through the atomic file exactly
    import csv
    with open(src / "Bili_Food_item.csv", encoding="utf-8", newline="") as f:
        expected = {r[0]: (r[1], r[2]) for r in csv.reader(f)}
    df = cv.read_atomic(tmp_path / "Bili_Food" / "Bili_Food.item")
    got = dict(zip(df["item_id"], zip(df["title"], df["title_en"])))
    assert got == {k: tuple(cv._one_line(x) for x in v) for k, v in expected.items()}
