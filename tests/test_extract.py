"""Feature extraction: ml-100k texts with the bundled MiniLM (offline), cache reuse/invalidation,
resumable chunks, images with a tiny random ViT (real, truncated, corrupt and absent files), CLI."""

import glob
import json
import logging
import os
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import recbole  # noqa: E402

from recbole_mm.data import extract  # noqa: E402
from recbole_mm.data.extract import (  # noqa: E402
    default_text_encoder,
    encode_images,
    encode_texts,
    extract_features,
    find_item_images,
    read_item_texts,
)
from recbole_mm.data.features import FeatureStore, align_to_dataset  # noqa: E402
from recbole_mm.features import chunks as feature_chunks, extract as feature_extract  # noqa: E402
from conftest import counting_encoder  # noqa: E402
from test_features import make_read_only  # noqa: E402,F401 - fixture

ML100K_DIR = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")
ML100K_ITEM = os.path.join(ML100K_DIR, "ml-100k.item")
TEMPLATE = "{movie_title} ({release_year}). Genres: {class}"
SPEC = {"type": "text", "template": TEMPLATE}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The test machine's 2 cores are shared with other jobs: one intra-op thread avoids the
    OpenMP spin-wait slowdown of 2 threads on a busy machine (2-3x faster here)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _ml100k_subset(root, n=None, name="ml-100k", edit=None):
    """Copy ml-100k.item (first ``n`` items) into ``root``; ``edit(lines)`` may change rows."""
    os.makedirs(root, exist_ok=True)
    with open(ML100K_ITEM, encoding="utf-8") as f:
        lines = f.read().splitlines()
    lines = lines if n is None else lines[: n + 1]
    if edit is not None:
        lines = edit(lines)
    with open(os.path.join(root, f"{name}.item"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(root)


def _tiny_bert(folder):
    """A random 1-layer BERT (dim 32) sharing MiniLM's tokenizer: 'another encoder', offline."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(default_text_encoder())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- reading texts


def test_default_text_encoder_is_local():
    path = default_text_encoder()
    assert os.path.isfile(os.path.join(path, "config.json"))


def test_read_item_texts(tmp_path):
    tokens, texts = read_item_texts(ML100K_ITEM)
    assert len(tokens) == len(texts) == 1682 and tokens[0] == "1"
    assert texts[0] == "Toy Story. 1995. Animation Children's Comedy"  # all token/token_seq fields
    tokens, texts = read_item_texts(ML100K_ITEM, fields=["movie_title", "class"])
    assert texts[1] == "GoldenEye. Action Adventure Thriller"
    _, texts = read_item_texts(ML100K_ITEM, template=TEMPLATE)
    assert texts[0] == "Toy Story (1995). Genres: Animation Children's Comedy"

    with pytest.raises(FileNotFoundError, match="nope.item"):
        read_item_texts(tmp_path / "nope.item")
    with pytest.raises(ValueError, match=r"ml-100k\.item.*unknown column.*'genre'.*available.*movie_title"):
        read_item_texts(ML100K_ITEM, fields=["movie_title", "genre"])
    with pytest.raises(ValueError, match=r"unknown column.*'title'"):
        read_item_texts(ML100K_ITEM, template="{title}")

    d = _ml100k_subset(tmp_path / "dup", 5, edit=lambda ls: ls + [ls[2]])
    with pytest.raises(ValueError, match=r"ml-100k\.item: duplicate item ids.*'2'"):
        read_item_texts(os.path.join(d, "ml-100k.item"))

    # quotes are read as RecBole reads them (pandas' quoting: a field opening with a quote is a
    # quoted field); 'NA'-like field values are missing (an item token 'NA' is just a token);
    # all-empty -> "" (missing)
    p = tmp_path / "q.item"
    p.write_text('item_id:token\ttitle:token_seq\tscore:float\n'
                 'a\t"Quoted, title"\t1.0\nNA\tNA\t2.0\nc\t\t3.0\nd\t5" screen\t4.0\n', encoding="utf-8")
    tokens, texts = read_item_texts(p)
    recbole = pd.read_csv(p, delimiter="\t", dtype=str, encoding="utf-8", engine="c")  # the plugin's RecBole load
    assert tokens == ["a", "NA", "c", "d"]
    assert texts[0] == recbole["title:token_seq"][0] == "Quoted, title" and texts[3] == '5" screen'
    assert texts[1:3] == ["", ""]
    # a quote closing before the field ends: pandas' C parser (the plugin's RecBole load) joins the
    # parts, and so does the reader; a quoted field never closed is a clear error
    last = tmp_path / "last.item"
    last.write_text('item_id:token\ttitle:token_seq\tscore:float\na\t"Quoted" title\t1.0\n', encoding="utf-8")
    assert read_item_texts(last)[1] == ["Quoted title"]
    bad = tmp_path / "bad.item"
    bad.write_text('item_id:token\ttitle:token_seq\na\t"never closed\nb\tx\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.item.*starts with a double quote.*QUOTE_MINIMAL"):
        read_item_texts(bad)
    _, texts = read_item_texts(p, missing_values=[])  # no markers: 'NA' is a title
    assert texts[1] == "NA"


def test_a_title_with_quotes_and_tabs_reaches_the_encoder_as_recbole_holds_it(tmp_path):
    """The converters write quoted fields (csv.QUOTE_MINIMAL); RecBole, the text extraction and the
    converters' own reader all read the one way (recbole_mm.data.atomic_file)."""
    from recbole_mm.data import convert as cv

    titles = ['He said "hi"', "tab\there", '"fully quoted"', "plain"]
    path = tmp_path / "t.item"
    cv._write_rows(path, ["item_id:token", "title:token_seq"], [[str(i), t] for i, t in enumerate(titles)])
    _, texts = read_item_texts(path, fields=["title"])
    recbole = pd.read_csv(path, delimiter="\t", dtype=str, encoding="utf-8", engine="c")
    assert texts == titles == list(recbole["title:token_seq"]) == list(cv.read_atomic(path)["title"])


# ----------------------------------------------------------------------------- text features


def test_text_features_ml100k_subset(tmp_path, caplog):
    def blank_item_7(lines):
        lines[7] = "7\t\t\t"
        return lines

    d = _ml100k_subset(tmp_path, 200, edit=blank_item_7)
    with caplog.at_level(logging.INFO, logger="recbole_mm"):
        fm = extract_features(d, "ml-100k", "text", SPEC, show_progress=False)
    assert "coverage" in caplog.text
    assert fm.matrix.shape == (200, 384) and fm.matrix.dtype == np.float32
    assert isinstance(fm.matrix, np.memmap)
    m = np.asarray(fm.matrix)
    assert fm.tokens[:3] == ["1", "2", "3"]
    assert fm.missing.sum() == 1 and fm.missing[fm.tokens.index("7")]
    np.testing.assert_array_equal(m[fm.tokens.index("7")], 0)
    others = m[~fm.missing]
    assert np.isfinite(others).all() and (np.abs(others).sum(axis=1) > 0).all()
    assert len(np.unique(others.round(5), axis=0)) == len(others)  # distinct rows
    man = fm.manifest
    assert man["encoder"] == "default" and man["type"] == "text" and man["template"] == TEMPLATE
    assert man["fields"] == ["movie_title", "release_year", "class"] and man["pooling"] == "mean"
    assert man["missing"] == ["7"] and man["n_items"] == 200 and man["dim"] == 384
    assert len(man["input_checksum"]) == 64
    assert not os.path.exists(FeatureStore(d, "ml-100k").chunk_dir("text"))  # chunks cleaned up

    # batching sorts by length: rows must still be in item order (compare with one-at-a-time)
    _, texts = read_item_texts(os.path.join(d, "ml-100k.item"), template=TEMPLATE)
    pick = [0, 1, 57, 150]
    single = encode_texts([texts[i] for i in pick], batch_size=1, show_progress=False)
    np.testing.assert_allclose(m[pick], single, atol=2e-5)
    # sentence semantics sanity: the two Godfathers are closer than a Godfather and Babe
    titles = [t.split(" (")[0] for t in texts]
    st1, st2 = m[titles.index("Godfather, The")], m[titles.index("Godfather: Part II, The")]
    other = m[titles.index("Babe")]

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cos(st1, st2) > cos(st1, other)

    # alignment to a RecBole-like id2token (subset, plus an unknown item)
    id2token = np.array(["[PAD]", "3", "1", "7", "5000"])
    table, missing, stats = align_to_dataset(fm, id2token, expected_dim=384)
    np.testing.assert_allclose(table[2], m[0])
    np.testing.assert_array_equal(missing, [True, False, False, True, True])
    assert stats["extra_tokens_in_features"] == 197 and stats["covered"] == 2


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch, caplog):
    d = _ml100k_subset(tmp_path / "ds", 24)
    fm1 = extract_features(d, "ml-100k", "text", SPEC, show_progress=False)
    m1 = np.array(fm1.matrix)

    calls = counting_encoder(monkeypatch)
    fm = extract_features(d, "ml-100k", "text", SPEC, show_progress=False)
    assert calls == []  # cache hit: nothing encoded
    np.testing.assert_array_equal(np.asarray(fm.matrix), m1)

    # one title changes -> recomputed, only that row moves
    def retitle(lines):  # item "5" (row 4): Copycat -> Copycat Redux
        cols = lines[5].split("\t")
        cols[1] += " Redux"
        lines[5] = "\t".join(cols)
        return lines
    _ml100k_subset(tmp_path / "ds", 24, edit=retitle)
    fm = extract_features(d, "ml-100k", "text", SPEC, show_progress=False)
    assert calls == [24]
    m2 = np.asarray(fm.matrix)
    assert not np.allclose(m2[4], m1[4])
    np.testing.assert_allclose(np.delete(m2, 4, axis=0), np.delete(m1, 4, axis=0), atol=2e-5)

    # template change -> recomputed
    extract_features(d, "ml-100k", "text", {"type": "text", "template": "{movie_title}"}, show_progress=False)
    assert calls == [24, 24]
    # pooling change -> recomputed
    extract_features(d, "ml-100k", "text", {"type": "text", "template": "{movie_title}", "pooling": "cls"},
                     show_progress=False)
    assert len(calls) == 3
    # another encoder -> recomputed, new dim
    enc = _tiny_bert(tmp_path / "tiny_bert")
    fm = extract_features(d, "ml-100k", "text", {"type": "text", "template": "{movie_title}", "encoder": enc},
                          show_progress=False)
    assert len(calls) == 4 and fm.dim == 32 and fm.manifest["encoder"] == enc
    # same again -> cached; float16 storage is a different feature file content -> recomputed
    extract_features(d, "ml-100k", "text", {"type": "text", "template": "{movie_title}", "encoder": enc},
                     show_progress=False)
    assert len(calls) == 4
    fm16 = extract_features(d, "ml-100k", "text",
                            {"type": "text", "template": "{movie_title}", "encoder": enc, "dtype": "float16"},
                            show_progress=False)
    assert len(calls) == 5 and fm16.matrix.dtype == np.float16

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recbole_mm"):  # typo: warned about, cache still used
        extract_features(d, "ml-100k", "text", {"type": "text", "template": "{movie_title}", "encoder": enc,
                                                "dtype": "float16", "dim": 32, "feilds": ["x"]}, show_progress=False)
    assert "['feilds']" in caplog.text and "dim" not in caplog.text.split("ignored")[0]
    assert len(calls) == 5
    with pytest.raises(ValueError, match="unknown type"):
        extract_features(d, "ml-100k", "text", {"type": "audio"})


def test_killed_extraction_resumes_from_chunks(tmp_path, monkeypatch, caplog):
    d = _ml100k_subset(tmp_path, 96)
    spec = dict(SPEC, chunk_size=32, batch_size=16)
    store = FeatureStore(d, "ml-100k")
    npy, man = store.paths("text")
    chunk_dir = store.chunk_dir("text")

    real_save_chunk = feature_chunks._save_chunk
    saved = []

    def dying_save_chunk(path, **arrays):
        if saved:  # killed while the second chunk is being written
            raise KeyboardInterrupt("simulated kill")
        real_save_chunk(path, **arrays)
        saved.append((path, arrays["emb"].copy()))

    monkeypatch.setattr(feature_chunks, "_save_chunk", dying_save_chunk)  # where _Chunks.put looks it up
    with pytest.raises(KeyboardInterrupt):
        extract_features(d, "ml-100k", "text", spec, show_progress=False)
    assert not os.path.exists(npy) and not os.path.exists(man)  # nothing looks valid
    assert not store.is_fresh("text", {"type": "text"})
    assert len(glob.glob(os.path.join(chunk_dir, "chunk_*.npz"))) == 1
    assert not [f for f in os.listdir(chunk_dir) if "tmp" in f]

    fresh = []

    def counting_save_chunk(path, **arrays):
        fresh.append(path)
        real_save_chunk(path, **arrays)

    monkeypatch.setattr(feature_chunks, "_save_chunk", counting_save_chunk)
    with caplog.at_level(logging.INFO, logger="recbole_mm"):
        fm = extract_features(d, "ml-100k", "text", spec, show_progress=False)
    assert len(fresh) == 2  # only the two unfinished chunks were encoded
    assert "reused 1/3" in caplog.text
    assert not os.path.exists(chunk_dir)  # removed after success
    m = np.asarray(fm.matrix)
    assert fm.matrix.shape == (96, 384) and np.isfinite(m).all() and not fm.missing.any()
    # the reused chunk holds real rows of the result
    first_chunk = saved[0][1]
    assert all(any(np.allclose(r, row, atol=1e-6) for row in m) for r in first_chunk[:3])
    # resumed rows are in item order
    _, texts = read_item_texts(os.path.join(d, "ml-100k.item"), template=TEMPLATE)
    pick = [0, 40, 95]
    np.testing.assert_allclose(m[pick], encode_texts([texts[i] for i in pick], show_progress=False), atol=2e-5)


def test_full_ml100k_second_run_uses_cache(tmp_path):
    """All 1,682 ml-100k items (title + genres); the second run must reuse the cache (>= 20x faster)."""
    d = _ml100k_subset(tmp_path)
    spec = {"type": "text", "fields": ["movie_title", "class"]}
    t0 = time.perf_counter()
    fm = extract_features(d, "ml-100k", "text", spec, show_progress=False)
    first = time.perf_counter() - t0
    assert fm.matrix.shape == (1682, 384) and not fm.missing.any()
    t0 = time.perf_counter()
    fm2 = extract_features(d, "ml-100k", "text", spec, show_progress=False)
    second = time.perf_counter() - t0
    assert fm2.tokens == fm.tokens
    np.testing.assert_array_equal(np.asarray(fm2.matrix), np.asarray(fm.matrix))
    assert first >= 20 * second, (first, second)


# ----------------------------------------------------------------------------- images


SK_IMAGES = os.path.join(os.path.dirname(__import__("sklearn").__file__), "datasets", "images")


def _image_dataset(root):
    """Items 1..7: real JPEG, real PNG, JPEG crop, 200-byte JPEG, no file, text-as-jpg, half JPEG."""
    from PIL import Image

    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir)
    china = os.path.join(SK_IMAGES, "china.jpg")
    flower = os.path.join(SK_IMAGES, "flower.jpg")
    shutil.copy(china, os.path.join(img_dir, "1.jpg"))
    Image.open(flower).save(os.path.join(img_dir, "2.png"))
    Image.open(flower).crop((0, 0, 200, 150)).save(os.path.join(img_dir, "3.jpeg"))
    data = open(china, "rb").read()
    with open(os.path.join(img_dir, "4.jpg"), "wb") as f:
        f.write(data[:200])  # truncated
    # item 5 has no image
    with open(os.path.join(img_dir, "6.jpg"), "w") as f:
        f.write("this is not an image")
    with open(os.path.join(img_dir, "7.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])  # truncated mid-scan: only load() notices
    shutil.copy(china, os.path.join(img_dir, "999.jpg"))  # an image of an unknown item: ignored
    with open(os.path.join(img_dir, "notes.txt"), "w") as f:
        f.write("not an image extension")
    rows = ["item_id:token\ttitle:token_seq\tpicture:token"]
    rows += [f"{i}\titem {i}\timages/{i}.{'png' if i == 2 else 'jpeg' if i == 3 else 'jpg'}" for i in range(1, 8)]
    with open(os.path.join(root, "toy.item"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return root


def test_find_item_images(tmp_path):
    d = _image_dataset(str(tmp_path))
    found = find_item_images(os.path.join(d, "images"), ["1", "2", "3", "5", "x"])
    assert [os.path.basename(p) if p else None for p in found] == ["1.jpg", "2.png", "3.jpeg", None, None]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_item_images(tmp_path / "nowhere", ["1"])


def test_image_features_with_bad_files(tmp_path, tiny_vit, caplog, monkeypatch):
    d = _image_dataset(str(tmp_path))
    spec = {"type": "image", "encoder": tiny_vit, "batch_size": 4, "chunk_size": 3}
    with caplog.at_level(logging.WARNING, logger="recbole_mm"):
        fm = extract_features(d, "toy", "image", spec, show_progress=False)
    assert fm.matrix.shape == (7, 32)
    m = np.asarray(fm.matrix)
    expected_missing = [False, False, False, True, True, True, True]
    np.testing.assert_array_equal(fm.missing, expected_missing)
    np.testing.assert_array_equal(m[fm.missing], 0)
    good = m[~fm.missing]
    assert np.isfinite(good).all() and (np.abs(good).sum(axis=1) > 0).all()
    assert not np.allclose(good[0], good[1]) and not np.allclose(good[1], good[2])
    man = fm.manifest
    assert man["problem_counts"] == {"missing_file": 1, "corrupt": 3, "unsupported_format": 0}
    assert man["problems"] == {"missing_file": ["5"], "corrupt": ["4", "6", "7"], "unsupported_format": []}
    assert sorted(man["missing"]) == ["4", "5", "6", "7"]
    for name in ("4.jpg", "6.jpg", "7.jpg"):
        assert name in caplog.text
    assert "'5'" in caplog.text
    assert "999" not in fm.tokens

    # cached; changing one image's bytes invalidates
    calls = []
    real = feature_extract.encode_images

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(feature_extract, "encode_images", counting)  # where _extract_features looks it up
    extract_features(d, "toy", "image", spec, show_progress=False)
    assert calls == []
    shutil.copy(os.path.join(SK_IMAGES, "flower.jpg"), os.path.join(d, "images", "1.jpg"))
    fm2 = extract_features(d, "toy", "image", spec, show_progress=False)
    assert calls == [1]
    assert not np.allclose(np.asarray(fm2.matrix)[0], m[0])
    np.testing.assert_allclose(np.asarray(fm2.matrix)[1:3], m[1:3], atol=1e-5)

    # pooling variants: cls / mean of last_hidden_state
    for pooling in ("cls", "mean"):
        x, missing, problems = encode_images([os.path.join(d, "images", "2.png"), None], tiny_vit,
                                             pooling=pooling, show_progress=False)
        assert x.shape == (2, 32) and missing.tolist() == [False, True] and problems["missing_file"] == [1]

    # an image path column instead of a folder
    fm3 = extract_features(d, "toy", "pic", {"type": "image", "encoder": tiny_vit, "image_field": "picture"},
                           show_progress=False)
    np.testing.assert_array_equal(fm3.missing, [False, False, False, True, True, True, True])
    np.testing.assert_allclose(np.asarray(fm3.matrix)[1:3], m[1:3], atol=1e-5)

    with pytest.raises(ValueError, match="encoder.*required"):
        extract_features(d, "toy", "image", {"type": "image"})


def test_encode_images_all_missing(tiny_vit, tmp_path):
    x, missing, problems = encode_images([None, str(tmp_path / "nope.jpg")], tiny_vit, show_progress=False)
    assert x.shape == (2, 32) and missing.all() and (x == 0).all()
    assert problems == {"missing_file": [0, 1], "corrupt": [], "unsupported_format": []}


# ----------------------------------------------------------------------------- CLI


def test_cli(tmp_path, capsys):
    d = _ml100k_subset(tmp_path, 12)
    rc = extract.main(["--dataset_dir", d, "--dataset", "ml-100k", "--name", "title", "--type", "text",
                       "--fields", "movie_title", "class", "--no_progress", "--dtype", "float16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ml-100k.title.npy: 12 items x 384 (float16)" in out
    fm = FeatureStore(d, "ml-100k").load("title")
    assert fm.manifest["fields"] == ["movie_title", "class"] and fm.manifest["template"] is None
    with pytest.raises(SystemExit):
        extract.main(["--dataset_dir", d, "--dataset", "ml-100k", "--name", "x", "--type", "audio"])


def test_encode_images_feature_map_model(tmp_path):
    """A CNN (ResNet: (B, C, 1, 1) pooler, (B, C, H, W) hidden states) works; a pooling that does
    not fit the model is a configuration error, not a 'corrupt image'."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    folder = str(tmp_path / "resnet")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    img = os.path.join(SK_IMAGES, "flower.jpg")
    for pooling in ("pooler", "mean"):
        x, missing, _ = encode_images([img, img], folder, pooling=pooling, show_progress=False)
        assert x.shape == (2, 16) and not missing.any() and np.allclose(x[0], x[1], atol=1e-5)
    with pytest.raises(ValueError, match="feature maps without a CLS token"):
        encode_images([img], folder, pooling="cls", show_progress=False)


def _extract_in_process(folder, out_path):
    import json as _json

    os.environ["OMP_NUM_THREADS"] = "1"
    from recbole_mm.data.extract import extract_features as _extract

    spec = {"type": "text", "encoder": "default", "pooling": "mean", "chunk_size": 4, "batch_size": 4}
    fm = _extract(folder, "tiny", "text", spec, show_progress=False)
    with open(out_path, "w") as f:
        _json.dump({"created": fm.manifest["created"], "seconds": fm.manifest["extraction_seconds"],
                    "rows": int(fm.matrix.shape[0])}, f)


def test_concurrent_extractions_of_one_feature_build_it_once(tmp_path):
    """Two processes (e.g. parallel study cells, or SICSRec's pair miner beside another model)
    asking for the same feature: one builds it in chunks, the other waits and reuses it. Before
    the lock, the second one's chunks vanished under it (FileNotFoundError)."""
    import json as _json
    import multiprocessing as mp

    from conftest import write_tiny_dataset

    folder = write_tiny_dataset(tmp_path, n_items=30)
    ctx = mp.get_context("spawn")
    outs = [str(tmp_path / f"out{i}.json") for i in range(2)]
    procs = [ctx.Process(target=_extract_in_process, args=(folder, o)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    a, b = (_json.load(open(o)) for o in outs)
    assert a == b and a["rows"] == 30  # the same build: one manifest (creation time, build seconds)
    assert not os.path.exists(FeatureStore(folder, "tiny").chunk_dir("text"))


# ----------------------------------------------------------------------------- trustworthy caches


def test_imported_matrix_survives_extraction(tmp_path, monkeypatch, caplog):
    """A matrix the user imported is used as is by extract_features (its spec is ignored) and
    never overwritten, not even with force=True."""
    d = _ml100k_subset(tmp_path, 6)
    store = FeatureStore(d, "ml-100k")
    tokens, _ = read_item_texts(os.path.join(d, "ml-100k.item"))
    mine = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    store.import_matrix("text", tokens, mine, source="my_clip_run")
    calls = counting_encoder(monkeypatch)
    for spec in (SPEC, {"type": "text", "fields": ["movie_title"], "pooling": "cls"}):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="recbole_mm"):
            fm = extract_features(d, "ml-100k", "text", spec, show_progress=False)
        assert calls == []
        np.testing.assert_array_equal(np.asarray(fm.matrix), mine)
        assert fm.manifest["type"] == "user" and fm.manifest["source"] == "my_clip_run"
        assert "user-supplied" in caplog.text and "spec is ignored" in caplog.text
    with pytest.raises(ValueError) as e:
        extract_features(d, "ml-100k", "text", SPEC, show_progress=False, force=True)
    assert "imported by the user" in str(e.value) and "FeatureStore.delete('text')" in str(e.value)
    assert calls == []
    np.testing.assert_array_equal(np.asarray(store.load("text").matrix), mine)


def test_hand_replaced_matrix_is_an_error_not_reextracted(tmp_path, monkeypatch):
    """A .npy swapped by hand (other shape, or same shape with rows reordered) no longer matches
    its manifest: a clear error naming both files and the fixes, never a silent re-extraction."""
    d = _ml100k_subset(tmp_path, 6)
    store = FeatureStore(d, "ml-100k")
    fm = extract_features(d, "ml-100k", "text", SPEC, show_progress=False)
    m = np.array(fm.matrix)
    npy, man = store.paths("text")
    calls = counting_encoder(monkeypatch)

    hand_made = np.ones((5, 384), dtype=np.float32)
    np.save(npy, hand_made)
    for spec in (SPEC, {"type": "text", "template": "{movie_title}"}):  # up to date, or stale
        with pytest.raises(ValueError) as e:
            extract_features(d, "ml-100k", "text", spec, show_progress=False)
        msg = str(e.value)
        assert npy in msg and man in msg and "shape: matrix (5, 384), manifest (6, 384)" in msg
        assert "import_matrix" in msg and "delete both files" in msg
    assert calls == []
    np.testing.assert_array_equal(np.load(npy), hand_made)  # left alone
    with pytest.raises(ValueError, match="does not match its manifest"):
        store.load("text")

    np.save(npy, m[::-1].copy())  # same shape and dtype, rows reordered
    for spec in (SPEC, {"type": "text", "template": "{movie_title}"}):
        with pytest.raises(ValueError, match=r"ml-100k\.text\.npy does not match its manifest.*checksum"):
            extract_features(d, "ml-100k", "text", spec, show_progress=False)
    with pytest.raises(ValueError, match="checksum"):
        store.load("text")
    assert calls == []
    np.testing.assert_array_equal(np.load(npy), m[::-1])


def test_stale_feature_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog):
    d = _ml100k_subset(tmp_path, 6)
    store = FeatureStore(d, "ml-100k")
    extract_features(d, "ml-100k", "text", SPEC, show_progress=False)
    calls = counting_encoder(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="recbole_mm"):
        fm = extract_features(d, "ml-100k", "text", {"type": "text", "template": "{movie_title}"},
                              show_progress=False)
    assert calls == [6] and fm.manifest["template"] == "{movie_title}"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "out of date" in text and "template" in text and "-> '{movie_title}'" in text
    assert "input_checksum" in text and "ml-100k.text.npy" in text

    # a cache written before missing_values existed (no such key, no matrix checksum) whose input
    # checksum (of the texts encoded) still matches is up to date: not rebuilt, no warning
    _, man = store.paths("text")
    old = json.load(open(man))
    del old["missing_values"], old["matrix_sha256"]
    json.dump(old, open(man, "w"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recbole_mm"):
        extract_features(d, "ml-100k", "text", {"type": "text", "template": "{movie_title}"}, show_progress=False)
    assert calls == [6] and not caplog.text
    # ... but when its inputs differ it is rebuilt, with the warning
    old["input_checksum"] = "0" * 64
    json.dump(old, open(man, "w"))
    with caplog.at_level(logging.WARNING, logger="recbole_mm"):
        extract_features(d, "ml-100k", "text", {"type": "text", "template": "{movie_title}"}, show_progress=False)
    assert calls == [6, 6] and "input_checksum" in caplog.text


NAN_ITEMS = """item_id:token\ttitle:token_seq\tgenre:token_seq
1\tToy Story\tComedy
2\tNaN\tnan
3\tNone\t
4\tnull\tNULL
5\tN/A\tn/a
6\t  na \tNone
7\tHeat\tnan
8\tNancy\tnone more
"""


def test_nan_like_titles_are_missing(tmp_path, caplog):
    item = tmp_path / "toy.item"
    item.write_text(NAN_ITEMS, encoding="utf-8")
    tokens, texts = read_item_texts(item)
    assert texts == ["Toy Story. Comedy", "", "", "", "", "", "Heat", "Nancy. none more"]
    _, texts = read_item_texts(item, template="{title}. Genres: {genre}")
    assert texts[6] == "Heat. Genres:" and texts[1] == ""  # the missing field is dropped, not 'nan'
    _, texts = read_item_texts(item, missing_values=["N/A"])  # only 'n/a' (and empty)
    assert texts[1] == "NaN. nan" and texts[4] == "" and texts[2] == "None"

    with caplog.at_level(logging.INFO, logger="recbole_mm"):
        fm = extract_features(tmp_path, "toy", "text", {"type": "text"}, show_progress=False)
    assert "read as missing" in caplog.text
    assert fm.missing.tolist() == [False, True, True, True, True, True, False, False]
    np.testing.assert_array_equal(np.asarray(fm.matrix)[fm.missing], 0)
    man = fm.manifest
    assert man["n_missing"] == 5 and man["n_empty_text"] == 5 and man["missing"] == ["2", "3", "4", "5", "6"]
    assert man["missing_value_counts"] == {"title": 5, "genre": 5}
    _, _, stats = align_to_dataset(fm, np.array(["[PAD]"] + [str(i) for i in range(1, 9)]))
    assert stats["no_content"] == 5 and stats["covered"] == 3

    # the markers are part of the cache key: another list rebuilds the feature
    fm2 = extract_features(tmp_path, "toy", "text", {"type": "text", "missing_values": []}, show_progress=False)
    assert fm2.missing.tolist() == [False] * 5 + [False, False, False] and fm2.manifest["missing_values"] == [""]
    args = extract.build_parser().parse_args(["--dataset_dir", "x", "--dataset", "y", "--name", "t",
                                              "--missing_values"])
    assert extract.spec_from_args(args)["missing_values"] == []


def test_read_only_dataset_folder(tmp_path, monkeypatch, make_read_only):
    """An up-to-date feature loads from an unwritable folder; one that must be rebuilt fails
    before encoding with an error naming the folder and the fix."""
    d = _ml100k_subset(tmp_path / "ds", 6)
    extract_features(d, "ml-100k", "text", SPEC, show_progress=False)
    lock = os.path.join(d, ".ml-100k.text.lock")
    os.remove(lock)  # e.g. a dataset shipped with its features
    before = sorted(os.listdir(d))
    make_read_only(d)
    calls = counting_encoder(monkeypatch)
    fm = extract_features(d, "ml-100k", "text", SPEC, show_progress=False)
    assert fm.matrix.shape == (6, 384) and calls == []
    with pytest.raises(PermissionError) as e:
        extract_features(d, "ml-100k", "text", {"type": "text", "template": "{movie_title}"}, show_progress=False)
    msg = str(e.value)
    assert f"dataset folder {d} is not writable" in msg
    assert "not writable" in msg and "data_path" in msg and "make the folder writable" in msg
    assert calls == []  # failed before encoding
    assert sorted(os.listdir(d)) == before


# ----------------------------------------------------------------------------- which items (issue 16)


def test_extract_encodes_only_the_requested_items(tmp_path, monkeypatch, caplog):
    """``items``: only those rows of the .item file are encoded and stored (a token the file lacks
    is skipped); a cache holding more items with the same inputs is reused; one lacking requested
    items is rebuilt for them and the items it held, with a WARNING saying why."""
    from conftest import write_tiny_dataset

    folder = write_tiny_dataset(tmp_path, n_items=20, extra_items=5)  # i21..i25: in no interaction
    spec = {"type": "text", "fields": ["title"]}
    calls = counting_encoder(monkeypatch)
    store = FeatureStore(folder, "tiny")
    used = [f"i{k}" for k in range(1, 21)]
    with caplog.at_level(logging.INFO, logger="recbole_mm"):
        fm = extract_features(folder, "tiny", "text", spec, show_progress=False, items=used + ["nope"])
    assert calls == [20] and fm.tokens == used and fm.manifest["items_in_file"] == 25
    assert "encoding 20 of 25 items (5 not used by the dataset; encode_items: all encodes them)" in caplog.text
    sub = np.asarray(fm.matrix).copy()
    extract_features(folder, "tiny", "text", spec, show_progress=False, items=used[:5])
    assert calls == [20]  # a subset of what it holds: reused

    # requested items the cache lacks: rebuilt for them and the ones it held, with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recbole_mm"):
        fm = extract_features(folder, "tiny", "text", spec, show_progress=False, items=["i3", "i22", "i24"])
    assert calls == [20, 22] and fm.tokens == used + ["i22", "i24"]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "lacks items" in warning[0] and "not for 2 of the 3 requested" in warning[0]
    assert "['i22', 'i24']" in warning[0] and "for 22 items" in warning[0]
    np.testing.assert_allclose(np.asarray(fm.matrix)[:20], sub, atol=2e-5)

    # no items (the CLI, encode_items: all): every row; that cache then serves any subset
    fm = extract_features(folder, "tiny", "text", spec, show_progress=False)
    assert calls == [20, 22, 25] and len(fm.tokens) == 25 and "items_in_file" in fm.manifest
    for items in (used, used[3:9], ["i25"]):
        fm = extract_features(folder, "tiny", "text", spec, show_progress=False, items=items)
        assert len(fm.tokens) == 25
    assert calls == [20, 22, 25]
    table, missing, stats = align_to_dataset(fm, np.array(["[PAD]"] + used))
    np.testing.assert_allclose(table[1:], sub, atol=2e-5)
    assert stats["extra_tokens_in_features"] == 5 and stats["covered"] == 20

    # a held item's text changes (even one not requested): its inputs differ, so it is rebuilt
    lines = open(os.path.join(folder, "tiny.item")).read().splitlines()
    lines[25] = lines[25].replace("item 25", "item twenty-five")
    open(os.path.join(folder, "tiny.item"), "w").write("\n".join(lines) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recbole_mm"):
        fm = extract_features(folder, "tiny", "text", spec, show_progress=False, items=used)
    assert calls == [20, 22, 25, 20] and fm.tokens == used
    assert "out of date" in caplog.text and "input_checksum" in caplog.text


def test_items_to_encode():
    from recbole_mm.data.extract import items_to_encode

    id2token = np.array(["[PAD]", "b", "a"])
    assert items_to_encode({"type": "text"}, id2token) == ["b", "a"]
    assert items_to_encode({"encode_items": "used"}, id2token) == ["b", "a"]
    assert items_to_encode({"encode_items": "all"}, id2token) is None
    with pytest.raises(ValueError, match="encode_items must be one of"):
        items_to_encode({"encode_items": "some"}, id2token)
