"""Convert raw public datasets into RecBole atomic files.

Three sources are supported:

* NineRec / Bilibili downstream datasets (``convert_ninerec``), optionally with
  SICSRec's exact leave-one-out split written as RecBole benchmark files;
* Amazon Reviews 2018 and 2023 dumps (``convert_amazon``) with iterative k-core
  filtering;
* the raw MovieLens formats ml-100k, ml-1m (and ml-10m) and ml-latest / ml-20m /
  ml-25m / ml-32m (``convert_movielens``).

Output goes to ``<out_dir>/<name>/<name>.inter`` and ``<name>.item`` (plus
``<name>.{train,valid,test}.inter`` for NineRec benchmarks). The files are
tab separated with a ``field:type`` header. Text fields never contain tabs or
line breaks; a field that contains a double quote is written CSV-quoted
(the quote doubled inside a quoted field), which is exactly what RecBole's ``pandas.read_csv`` call
expects. Read the files with :func:`read_atomic` (or pandas), never with a bare
``str.split('\\t')``.

Every file is written to ``<file>.tmp`` first and moved into place with
``os.replace``, so an interrupted conversion never leaves a truncated file
under the final name.

Command line::

    python -m recbole_mm.data.convert ninerec --src DIR --out dataset/
    python -m recbole_mm.data.convert amazon --reviews R --meta M --name NAME --out dataset/
    python -m recbole_mm.data.convert movielens --src DIR --name ml-1m --out dataset/

This module deliberately imports neither torch nor RecBole.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import gzip
import html
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from recbole_mm.atomic import atomic_open

logger = logging.getLogger(__name__)

__all__ = [
    "convert_ninerec",
    "convert_amazon",
    "convert_movielens",
    "read_atomic",
    "main",
]

# how many individual warnings of one kind are logged before only counting
_MAX_WARNINGS_SHOWN = 5

# header types of the atomic files written here
INTER_HEADER = ["user_id:token", "item_id:token", "timestamp:float"]
BENCHMARK_HEADER = ["user_id:token", "item_id_list:token_seq", "item_id:token"]
NINEREC_ITEM_HEADER = ["item_id:token", "title:token_seq", "title_en:token_seq"]
AMAZON_ITEM_HEADER = [
    "item_id:token",
    "title:token_seq",
    "description:token_seq",
    "categories:token_seq",
    "image_url:token",
]
MOVIELENS_INTER_HEADER = [
    "user_id:token",
    "item_id:token",
    "rating:float",
    "timestamp:float",
]
MOVIELENS_ITEM_HEADER = [
    "item_id:token",
    "movie_title:token_seq",
    "release_year:token",
    "class:token_seq",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------


def _progress(iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
    """tqdm bar that is shown on a terminal only (``disable=None``)."""
    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False,
                mininterval=0.5)


class _WarningCounter:
    """Counts warnings per kind and logs only the first few of each kind."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def warn(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        n = self.counts[kind]
        if n <= _MAX_WARNINGS_SHOWN:
            logger.warning(message)
        elif n == _MAX_WARNINGS_SHOWN + 1:
            logger.warning("further '%s' warnings are only counted", kind)

    def report(self) -> None:
        for kind, n in sorted(self.counts.items()):
            logger.warning("%d x %s", n, kind)


# characters that would break a line- and tab-based file
_LINE_BREAKING = re.compile(r"[\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")
_HTML_TAG = re.compile(r"<[^<>]{0,2000}>")
_WHITESPACE = re.compile(r"\s+")


def _one_line(text: Any) -> str:
    """Replace tabs and line breaks by spaces and drop control characters."""
    if text is None:
        return ""
    text = str(text)
    text = _LINE_BREAKING.sub(" ", text)
    return _CONTROL.sub("", text)


def clean_text(text: Any) -> str:
    """HTML tags stripped, entities unescaped, whitespace collapsed."""
    if text is None:
        return ""
    if isinstance(text, (list, tuple)):
        text = " ".join(clean_text(t) for t in text)
    text = str(text)
    text = _HTML_TAG.sub(" ", text)
    text = html.unescape(text)
    text = _HTML_TAG.sub(" ", text)  # tags that were entity-escaped
    text = _CONTROL.sub("", text)
    return _WHITESPACE.sub(" ", text).strip()


def _as_token(value: Any) -> str:
    """A single token: no whitespace at all (spaces become ``%20``)."""
    if value is None:
        return ""
    return _WHITESPACE.sub("%20", str(value).strip())


def _fmt_num(value: float) -> str:
    value = float(value)
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


@contextlib.contextmanager
def _atomic_writer(path: Path, header: list[str]):
    """Yield a csv writer on a temporary file that replaces ``path`` on success (recbole_mm.atomic)."""
    with atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n",
                            quoting=csv.QUOTE_MINIMAL, quotechar='"',
                            doublequote=True)
        # header written raw: RecBole parses it with str.split
        f.write("\t".join(header) + "\n")
        yield writer


def _write_rows(path: Path, header: list[str], rows: Iterable[Iterable[Any]],
                desc: str | None = None, total: int | None = None) -> int:
    n = 0
    with _atomic_writer(path, header) as writer:
        iterable = _progress(rows, desc, total) if desc else rows
        for row in iterable:
            writer.writerow(row)
            n += 1
    return n


def read_atomic(path: str | os.PathLike) -> pd.DataFrame:
    """Read an atomic file written by this module as strings, as RecBole parses it
    (:func:`recbole_mm.data.atomic_file.read_atomic_file`).

    Column names are the field names without their type; the types are in
    ``df.attrs["field_types"]``. Empty values stay empty strings.
    """
    from .atomic_file import read_atomic_file

    df, types = read_atomic_file(str(path))
    df.attrs["field_types"] = types
    return df


def _open_text(path: Path) -> io.TextIOBase:
    """Open a text file, transparently gunzipping it (by magic bytes)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, "r", encoding="utf-8", errors="replace")


def _require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; expected {what}")
    return path


def _dataset_dir(out_dir: str | os.PathLike, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"invalid dataset name {name!r}")
    d = Path(out_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _log_summary(kind: str, summary: dict) -> None:
    logger.info("%s conversion summary: %s", kind,
                ", ".join(f"{k}={v}" for k, v in summary.items()))


# ----------------------------------------------------------------------------
# NineRec / Bilibili
# ----------------------------------------------------------------------------

_INT_RE = re.compile(r"^\d+$")


def _read_ninerec_sequences(path: Path) -> list[tuple[str, list[str]]]:
    users: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(_progress(f, "read sequences"), start=1):
            tokens = line.split()
            if not tokens:
                continue
            for tok in tokens:
                if not _INT_RE.match(tok):
                    raise ValueError(
                        f"{path}:{lineno}: non-integer id {tok!r}; expected "
                        "'user_id item_1 item_2 ...' with 0-based integer ids")
            uid = str(int(tokens[0]))
            if uid in seen:
                raise ValueError(f"{path}:{lineno}: user id {uid} appears on "
                                 "more than one line")
            seen.add(uid)
            users.append((uid, [str(int(t)) for t in tokens[1:]]))
    return users


def _read_ninerec_items(path: Path) -> dict[str, tuple[str, str]]:
    items: dict[str, tuple[str, str]] = {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            lineno = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 3:
                raise ValueError(
                    f"{path}:{lineno}: expected 3 comma-separated columns "
                    f"'item_id,chinese_title,english_title', got {len(row)}")
            raw_id = row[0].strip()
            if not _INT_RE.match(raw_id):
                raise ValueError(f"{path}:{lineno}: non-integer item id {raw_id!r}")
            iid = str(int(raw_id))
            if iid in items:
                raise ValueError(f"{path}:{lineno}: duplicate item id {iid}")
            items[iid] = (_one_line(row[1]), _one_line(row[2]))
    return items


def _ninerec_split_rows(users: list[tuple[str, list[str]]], max_history: int):
    """SICSRec's leave-one-out split as (train, valid, test) row lists."""
    train, valid, test = [], [], []
    for uid, seq in users:
        part = seq[:-2]
        for i in range(1, len(part)):
            train.append((uid, " ".join(part[max(0, i - max_history):i]), part[i]))
        valid.append((uid, " ".join(part[-max_history:]), seq[-2]))
        test.append((uid, " ".join(seq[:-1][-max_history:]), seq[-1]))
    return train, valid, test


def convert_ninerec(src_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    name: str | None = None, benchmark: bool = True,
                    max_history: int = 50) -> dict:
    """Convert a NineRec (Bilibili) downstream dataset into RecBole atomic files.

    Args:
        src_dir: folder with ``sequential_data.txt`` and ``<name>_item.csv``
            (optionally ``<name>_cover/<item_id>.jpg``).
        out_dir: parent folder; files go to ``<out_dir>/<name>/``.
        name: dataset name, default: the name of ``src_dir``.
        benchmark: also write SICSRec's split as ``<name>.{train,valid,test}.inter``.
        max_history: history truncation of the benchmark files.

    Returns:
        summary dict (users, items, interactions, train/valid/test rows, ...).
    """
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(
            f"{src_dir}: directory not found; expected a NineRec dataset folder "
            "with sequential_data.txt and <name>_item.csv")
    name = name or src_dir.resolve().name
    if max_history < 1:
        raise ValueError("max_history must be >= 1")
    seq_path = _require_file(
        src_dir / "sequential_data.txt",
        "one user per line: 'user_id item_1 item_2 ...' (0-based ids, chronological)")
    item_path = _require_file(
        src_dir / f"{name}_item.csv",
        "a header-less CSV 'item_id,chinese_title,english_title' "
        "(pass name= if the file prefix differs from the folder name)")
    warnings = _WarningCounter()

    users = _read_ninerec_sequences(seq_path)
    items = _read_ninerec_items(item_path)

    kept = []
    for uid, seq in users:
        if len(seq) < 3:
            warnings.warn("user with fewer than 3 items skipped",
                          f"{seq_path}: user {uid} has {len(seq)} items "
                          "(< 3, needed for leave-one-out); skipped")
            continue
        kept.append((uid, seq))
    skipped_users = len(users) - len(kept)
    short_users = sum(1 for _, seq in kept if len(seq) == 3)
    if short_users:
        # RecBole's own LS split keeps >= 1 training sample per user, so for a
        # 3-item user it yields train + test and no validation sample; the
        # benchmark files follow SICSRec exactly.
        logger.warning("%d users have exactly 3 items: RecBole's LS split of the "
                       ".inter file gives them no validation sample (unlike SICSRec "
                       "and the benchmark files)", short_users)

    used_items: dict[str, None] = {}
    for _, seq in kept:
        for iid in seq:
            used_items.setdefault(iid, None)
    missing = [iid for iid in used_items if iid not in items]
    for iid in missing:
        warnings.warn("item without a row in the item csv",
                      f"{item_path}: item {iid} occurs in {seq_path.name} but has "
                      "no title row; written with empty titles")

    out = _dataset_dir(out_dir, name)
    n_inter = _write_rows(
        out / f"{name}.inter", INTER_HEADER,
        ((uid, iid, pos) for uid, seq in kept for pos, iid in enumerate(seq)),
        desc="write .inter")

    def item_rows():
        for iid, (title, title_en) in items.items():
            yield iid, title, title_en
        for iid in missing:
            yield iid, "", ""

    n_item_rows = _write_rows(out / f"{name}.item", NINEREC_ITEM_HEADER, item_rows())

    summary: dict[str, Any] = {
        "name": name,
        "out_dir": str(out),
        "users": len(kept),
        "items": len(used_items),
        "interactions": n_inter,
        "item_rows": n_item_rows,
        "items_in_csv": len(items),
        "items_missing_in_csv": len(missing),
        "skipped_users": skipped_users,
        "users_with_3_items": short_users,
        "train_rows": None,
        "valid_rows": None,
        "test_rows": None,
        "cover_images": None,
    }
    if benchmark:
        train, valid, test = _ninerec_split_rows(kept, max_history)
        for split, rows in (("train", train), ("valid", valid), ("test", test)):
            _write_rows(out / f"{name}.{split}.inter", BENCHMARK_HEADER, rows)
        summary.update(train_rows=len(train), valid_rows=len(valid),
                       test_rows=len(test))

    cover_dir = src_dir / f"{name}_cover"
    if cover_dir.is_dir():
        stems = {p.stem for p in cover_dir.iterdir()
                 if p.suffix.lower() in IMAGE_EXTENSIONS}
        summary["cover_images"] = sum(1 for iid in used_items if iid in stems)
        logger.info("%s: cover images for %d of %d items (found by file name "
                    "<item_id>.jpg; not copied)", cover_dir,
                    summary["cover_images"], len(used_items))
    warnings.report()
    _log_summary("NineRec", summary)
    return summary


# ----------------------------------------------------------------------------
# Amazon Reviews 2018 / 2023
# ----------------------------------------------------------------------------

AMAZON_REVIEW_FORMATS = {
    "2018": ("reviewerID", "asin", "unixReviewTime"),
    "2023": ("user_id", "parent_asin|asin", "timestamp"),
}
_AMAZON_FORMAT_HELP = (
    "expected JSON lines in the Amazon Reviews 2018 format "
    "(keys reviewerID, asin, unixReviewTime, overall) or the 2023 format "
    "(keys user_id, parent_asin or asin, timestamp in ms, rating)")
_AMAZON_META_HELP = (
    "expected JSON lines of item metadata with key 'asin' (2018: title, "
    "description, category, imageURL/imageURLHighRes) or 'parent_asin' (2023: "
    "title, description, categories, images)")


def _iter_json_lines(path: Path, desc: str, warnings: _WarningCounter
                     ) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record); malformed lines are counted and skipped.

    Lines that are not JSON but Python dict literals (the 2014 metadata dumps)
    are accepted too.
    """
    with _open_text(path) as f:
        for lineno, line in enumerate(_progress(f, desc), start=1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                try:
                    rec = ast.literal_eval(line) if line.startswith("{") else None
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    rec = None
            if not isinstance(rec, dict):
                warnings.warn(f"malformed line in {path.name}",
                              f"{path}:{lineno}: malformed JSON line skipped")
                continue
            yield lineno, rec


def _read_amazon_reviews(path: Path, warnings: _WarningCounter):
    user_codes: dict[str, int] = {}
    item_codes: dict[str, int] = {}
    users: list[int] = []
    items: list[int] = []
    times: list[float] = []
    fmt = None
    for lineno, rec in _iter_json_lines(path, "read reviews", warnings):
        if fmt is None:
            if "reviewerID" in rec:
                fmt = "2018"
            elif "user_id" in rec:
                fmt = "2023"
            else:
                raise ValueError(f"{path}:{lineno}: unknown review record with "
                                 f"keys {sorted(rec)[:12]}; {_AMAZON_FORMAT_HELP}")
            logger.info("%s: Amazon Reviews %s format", path, fmt)
        try:
            if fmt == "2018":
                user, item, ts = rec["reviewerID"], rec["asin"], float(rec["unixReviewTime"])
            else:
                user = rec["user_id"]
                item = rec.get("parent_asin") or rec["asin"]
                ts = float(rec["timestamp"]) / 1000.0
        except KeyError as e:
            keys = ", ".join(AMAZON_REVIEW_FORMATS[fmt])
            raise ValueError(f"{path}:{lineno}: missing key {e.args[0]!r}; the file "
                             f"looks like the {fmt} format whose review records need "
                             f"the keys {keys}; {_AMAZON_FORMAT_HELP}") from None
        except (TypeError, ValueError):
            warnings.warn(f"bad timestamp in {path.name}",
                          f"{path}:{lineno}: non-numeric timestamp; line skipped")
            continue
        user, item = _as_token(user), _as_token(item)
        if not user or not item:
            warnings.warn(f"empty id in {path.name}",
                          f"{path}:{lineno}: empty user or item id; line skipped")
            continue
        users.append(user_codes.setdefault(user, len(user_codes)))
        items.append(item_codes.setdefault(item, len(item_codes)))
        times.append(ts)
    if fmt is None:
        raise ValueError(f"{path}: no review records found; {_AMAZON_FORMAT_HELP}")
    return (fmt, np.array(users, dtype=np.int64), np.array(items, dtype=np.int64),
            np.array(times, dtype=np.float64), list(user_codes), list(item_codes))


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions in the iterative k-core (users and items >= k)."""
    mask = np.ones(len(users), dtype=bool)
    if k <= 1 or len(users) == 0:
        return mask
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    while True:
        ucnt = np.bincount(users[mask], minlength=n_users)
        icnt = np.bincount(items[mask], minlength=n_items)
        new = mask & (ucnt[users] >= k) & (icnt[items] >= k)
        if new.sum() == mask.sum():
            return new
        mask = new


def _flatten_strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for v in value:
            out.extend(_flatten_strings(v))
        return out
    return [str(value)]


def _first_image_url(rec: dict) -> str:
    # 2018: lists of URLs; 2014: imUrl string
    for key in ("imageURLHighRes", "imageURL", "imUrl"):
        urls = [u for u in _flatten_strings(rec.get(key)) if u and u.strip()]
        if urls:
            return urls[0]
    images = rec.get("images")
    if isinstance(images, dict):  # column-wise variant (Hugging Face parquet export)
        for key in ("hi_res", "large", "thumb"):
            urls = [u for u in _flatten_strings(images.get(key)) if u and u.strip()]
            if urls:
                return urls[0]
    elif isinstance(images, list):
        dicts = [im for im in images if isinstance(im, dict)]
        main = [im for im in dicts if str(im.get("variant", "")).upper() == "MAIN"]
        for im in main + dicts:
            for key in ("hi_res", "large", "thumb"):
                if isinstance(im.get(key), str) and im[key].strip():
                    return im[key]
        strings = [u for u in images if isinstance(u, str) and u.strip()]
        if strings:
            return strings[0]
    return ""


def _amazon_meta_fields(rec: dict) -> tuple[str, str, str, str]:
    title = clean_text(rec.get("title"))
    description = clean_text(_flatten_strings(rec.get("description")))
    if "categories" in rec:  # 2023 (and 2014 nested lists)
        cats = _flatten_strings(rec.get("categories"))
        if not cats and rec.get("main_category"):
            cats = [rec["main_category"]]
    else:  # 2018
        cats = _flatten_strings(rec.get("category"))
    cats = [c for c in (clean_text(c) for c in cats) if c]
    return title, description, " ".join(cats), _as_token(_first_image_url(rec))


def _read_amazon_meta(path: Path, wanted: set[str], warnings: _WarningCounter
                      ) -> dict[str, tuple[str, str, str, str]]:
    meta: dict[str, tuple[str, str, str, str]] = {}
    n_records = 0
    for lineno, rec in _iter_json_lines(path, "read metadata", warnings):
        n_records += 1
        item = rec.get("parent_asin") or rec.get("asin")
        if not item:
            raise ValueError(f"{path}:{lineno}: metadata record without 'asin' or "
                             f"'parent_asin' (keys {sorted(rec)[:12]}); "
                             f"{_AMAZON_META_HELP}")
        item = _as_token(item)
        if item in wanted and item not in meta:
            meta[item] = _amazon_meta_fields(rec)
    if n_records == 0:
        raise ValueError(f"{path}: no metadata records found; {_AMAZON_META_HELP}")
    return meta


def _local_images(image_dir: Path) -> set[str]:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image directory not found; expected "
                                "images named <item_id>.<ext>")
    return {p.stem for p in image_dir.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}


def convert_amazon(reviews_path: str | os.PathLike, meta_path: str | os.PathLike,
                   out_dir: str | os.PathLike, name: str, kcore: int = 5,
                   image_dir: str | os.PathLike | None = None) -> dict:
    """Convert an Amazon Reviews (2018 or 2023) category into RecBole atomic files.

    Reviews and metadata may be ``.json``/``.jsonl`` or gzipped. Duplicate
    (user, item, time) reviews are dropped, then users and items are filtered
    iteratively until both have at least ``kcore`` interactions. The ``.item``
    file holds the kept items only (items without metadata get empty text).
    """
    reviews_path = _require_file(Path(reviews_path), _AMAZON_FORMAT_HELP)
    meta_path = _require_file(Path(meta_path), _AMAZON_META_HELP)
    warnings = _WarningCounter()
    local = _local_images(Path(image_dir)) if image_dir is not None else None

    fmt, u, i, t, user_names, item_names = _read_amazon_reviews(reviews_path, warnings)
    raw = len(u)
    # sort by user, time, item and drop exact duplicates
    order = np.lexsort((i, t, u))
    u, i, t = u[order], i[order], t[order]
    if len(u):
        dup = np.zeros(len(u), dtype=bool)
        dup[1:] = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
        u, i, t = u[~dup], i[~dup], t[~dup]
    deduped = len(u)
    mask = kcore_mask(u, i, kcore)
    u, i, t = u[mask], i[mask], t[mask]
    if len(u) == 0:
        logger.warning("no interaction survives the %d-core filter", kcore)

    kept_items = sorted({item_names[c] for c in np.unique(i)})
    meta = _read_amazon_meta(meta_path, set(kept_items), warnings)
    no_meta = [it for it in kept_items if it not in meta]
    for it in no_meta:
        warnings.warn("kept item without metadata",
                      f"{meta_path}: no metadata for item {it}; empty text written")

    out = _dataset_dir(out_dir, name)
    n_inter = _write_rows(
        out / f"{name}.inter", INTER_HEADER,
        ((user_names[a], item_names[b], _fmt_num(c)) for a, b, c in zip(u, i, t)),
        desc="write .inter", total=len(u))
    empty = ("", "", "", "")
    _write_rows(out / f"{name}.item", AMAZON_ITEM_HEADER,
                ((it, *meta.get(it, empty)) for it in kept_items))

    summary: dict[str, Any] = {
        "name": name,
        "out_dir": str(out),
        "format": fmt,
        "users": int(len(np.unique(u))),
        "items": len(kept_items),
        "interactions": n_inter,
        "raw_interactions": raw,
        "duplicates_removed": raw - deduped,
        "kcore": kcore,
        "malformed_lines": sum(n for k, n in warnings.counts.items()
                               if k.startswith("malformed line")),
        "items_without_meta": len(no_meta),
        "items_without_title": sum(1 for it in kept_items
                                   if not meta.get(it, empty)[0]),
        "items_with_image_url": sum(1 for it in kept_items if meta.get(it, empty)[3]),
        "local_images": None,
    }
    if local is not None:
        summary["local_images"] = sum(1 for it in kept_items if it in local)
        logger.info("%s: local images for %d of %d kept items (not copied)",
                    image_dir, summary["local_images"], len(kept_items))
    warnings.report()
    _log_summary("Amazon", summary)
    return summary


# ----------------------------------------------------------------------------
# MovieLens
# ----------------------------------------------------------------------------

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
_TITLE_YEAR = re.compile(r"\s*\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)\s*$")
_MOVIELENS_HELP = (
    "expected one of the raw MovieLens layouts: ml-100k (u.data + u.item "
    "[+ u.genre]), ml-1m/ml-10m (ratings.dat + movies.dat) or ml-latest/ml-20m/"
    "ml-25m/ml-32m (ratings.csv + movies.csv)")


def _read_text_any(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _split_title(title: str) -> tuple[str, str]:
    """'Toy Story (1995)' -> ('Toy Story', '1995')."""
    title = title.strip()
    m = _TITLE_YEAR.search(title)
    if m:
        return title[: m.start()].strip(), m.group(1)
    return title, ""


def _genres_text(genres: Iterable[str]) -> str:
    out = []
    for g in genres:
        g = g.strip()
        if not g or g == "(no genres listed)":
            continue
        out.append(_WHITESPACE.sub("-", g))
    return " ".join(out)


def _read_ratings(path: Path, sep: str, warnings: _WarningCounter) -> pd.DataFrame:
    """Ratings as a DataFrame (user_id, item_id: str; rating, timestamp: float).

    Lines that do not have exactly four fields ``user sep item sep rating sep
    timestamp`` with integer ids and numeric values are counted and skipped; a
    non-numeric first line is taken as a header.
    """
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    times: list[float] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(_progress(f, f"read {path.name}"), start=1):
            line = line.strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split(sep)]
            try:
                if len(parts) != 4 or not (parts[0].isdigit() and parts[1].isdigit()):
                    raise ValueError
                rating, ts = float(parts[2]), float(parts[3])
            except ValueError:
                if lineno == 1 and not line[:1].isdigit():
                    continue  # header, e.g. 'userId,movieId,rating,timestamp'
                warnings.warn(f"malformed line in {path.name}",
                              f"{path}:{lineno}: malformed rating line skipped "
                              f"(expected user, item, rating, timestamp separated "
                              f"by {sep!r})")
                continue
            users.append(str(int(parts[0])))
            items.append(str(int(parts[1])))
            ratings.append(rating)
            times.append(ts)
    return pd.DataFrame({"user_id": users, "item_id": items,
                         "rating": np.array(ratings, dtype=np.float64),
                         "timestamp": np.array(times, dtype=np.float64)})


def _ml100k_items(src: Path) -> dict[str, tuple[str, str, str]]:
    genres = list(ML100K_GENRES)
    genre_path = src / "u.genre"
    if genre_path.is_file():
        pairs = []
        for line in _read_text_any(genre_path).splitlines():
            if line.strip():
                gname, _, idx = line.strip().rpartition("|")
                pairs.append((int(idx), gname))
        genres = [g for _, g in sorted(pairs)]
    path = src / "u.item"
    items = {}
    for lineno, line in enumerate(path.read_bytes().decode("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 5 + len(genres) or not parts[0].strip().isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'movie id|title|release date|"
                             f"video release date|IMDb URL|{len(genres)} genre flags'")
        title, year = _split_title(parts[1])
        date = parts[2].strip()
        if re.fullmatch(r".*\d{4}", date):
            year = date[-4:]
        flags = parts[5:5 + len(genres)]
        names = [g for g, f in zip(genres, flags) if f.strip() == "1"]
        items[str(int(parts[0]))] = (_one_line(title), year, _genres_text(names))
    return items


def _dat_items(path: Path) -> dict[str, tuple[str, str, str]]:
    items = {}
    for lineno, line in enumerate(_read_text_any(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'MovieID::Title (Year)::Genres'")
        title, year = _split_title(parts[1])
        items[str(int(parts[0]))] = (_one_line(title), year,
                                     _genres_text(parts[2].split("|")))
    return items


def _csv_items(path: Path) -> dict[str, tuple[str, str, str]]:
    items = {}
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["movieId", "title", "genres"]:
            raise ValueError(f"{path}: expected the header 'movieId,title,genres'")
        for row in reader:
            if not row:
                continue
            if len(row) != 3 or not row[0].strip().isdigit():
                raise ValueError(f"{path}:{reader.line_num}: expected 'movieId,title,genres'")
            title, year = _split_title(row[1])
            items[str(int(row[0]))] = (_one_line(title), year,
                                       _genres_text(row[2].split("|")))
    return items


def convert_movielens(src: str | os.PathLike, out_dir: str | os.PathLike,
                      name: str) -> dict:
    """Convert a raw MovieLens folder into RecBole atomic files.

    The ``.item`` file has the columns of RecBole's shipped ml-100k.item
    (``movie_title``, ``release_year``, ``class``) and lists the rated movies
    only; ``.inter`` has ``user_id, item_id, rating, timestamp``.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: directory not found; {_MOVIELENS_HELP}")
    warnings = _WarningCounter()
    if (src / "u.data").is_file():
        layout = "ml-100k"
        _require_file(src / "u.item", "u.item next to u.data (ml-100k layout)")
        ratings = _read_ratings(src / "u.data", "\t", warnings)
        items = _ml100k_items(src)
    elif (src / "ratings.dat").is_file():
        layout = "ml-1m"
        movies = _require_file(src / "movies.dat",
                               "movies.dat next to ratings.dat (ml-1m layout)")
        ratings = _read_ratings(src / "ratings.dat", "::", warnings)
        items = _dat_items(movies)
    elif (src / "ratings.csv").is_file():
        layout = "ml-latest"
        movies = _require_file(src / "movies.csv",
                               "movies.csv next to ratings.csv (ml-latest layout)")
        ratings = _read_ratings(src / "ratings.csv", ",", warnings)
        items = _csv_items(movies)
    else:
        raise FileNotFoundError(f"{src}: no u.data, ratings.dat or ratings.csv; "
                                f"{_MOVIELENS_HELP}")
    logger.info("%s: MovieLens %s layout, %d ratings", src, layout, len(ratings))

    order = np.lexsort((ratings["timestamp"].to_numpy(),
                        ratings["user_id"].astype(np.int64).to_numpy()))
    ratings = ratings.iloc[order]  # by user, then time (stable)
    rated = list(dict.fromkeys(ratings["item_id"]))
    rated.sort(key=int)
    missing = [it for it in rated if it not in items]
    for it in missing:
        warnings.warn("rated movie without a movie row",
                      f"{src}: movie {it} is rated but not listed; empty text written")

    out = _dataset_dir(out_dir, name)
    n_inter = _write_rows(
        out / f"{name}.inter", MOVIELENS_INTER_HEADER,
        ((a, b, _fmt_num(c), _fmt_num(d)) for a, b, c, d in zip(
            ratings["user_id"], ratings["item_id"], ratings["rating"],
            ratings["timestamp"])),
        desc="write .inter", total=len(ratings))
    _write_rows(out / f"{name}.item", MOVIELENS_ITEM_HEADER,
                ((it, *items.get(it, ("", "", ""))) for it in rated))
    summary: dict[str, Any] = {
        "name": name,
        "out_dir": str(out),
        "layout": layout,
        "users": int(ratings["user_id"].nunique()),
        "items": len(rated),
        "interactions": n_inter,
        "movies_listed": len(items),
        "unrated_movies_dropped": len(set(items) - set(rated)),
        "rated_movies_without_row": len(missing),
        "malformed_lines": sum(n for k, n in warnings.counts.items()
                               if k.startswith("malformed line")),
    }
    warnings.report()
    _log_summary("MovieLens", summary)
    return summary


# ----------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_mm.data.convert",
        description="Convert raw datasets into RecBole atomic files "
                    "(<out>/<name>/<name>.inter and <name>.item).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  %(prog)s ninerec --src ../shared/data/ninerec_bili/Bili_Food --out dataset/\n"
               "  %(prog)s amazon --reviews Beauty.json.gz --meta meta_Beauty.json.gz "
               "--name Amazon_Beauty --out dataset/\n"
               "  %(prog)s movielens --src ml-1m/ --name ml-1m --out dataset/")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="only log warnings (the JSON summary is still printed)")
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = sub.add_parser("ninerec", parents=[common], help="NineRec / Bilibili downstream dataset",
                       description="Convert a NineRec folder (sequential_data.txt, "
                                   "<name>_item.csv) and write SICSRec's leave-one-out "
                                   "split as benchmark files.")
    p.add_argument("--src", required=True, help="dataset folder, e.g. .../Bili_Food")
    p.add_argument("--out", required=True, help="output parent folder, e.g. dataset/")
    p.add_argument("--name", default=None,
                   help="dataset name (default: the name of the --src folder)")
    p.add_argument("--no-benchmark", action="store_true",
                   help="do not write <name>.{train,valid,test}.inter")
    p.add_argument("--max-history", type=int, default=50,
                   help="history length of the benchmark files (default: 50)")

    p = sub.add_parser("amazon", parents=[common], help="Amazon Reviews 2018 or 2023 category",
                       description="Convert Amazon reviews + metadata JSON lines "
                                   "(.json/.jsonl, optionally .gz) with k-core filtering.")
    p.add_argument("--reviews", required=True, help="reviews file (JSON lines, may be .gz)")
    p.add_argument("--meta", required=True, help="metadata file (JSON lines, may be .gz)")
    p.add_argument("--name", required=True, help="dataset name, e.g. Amazon_Beauty")
    p.add_argument("--out", required=True, help="output parent folder, e.g. dataset/")
    p.add_argument("--kcore", type=int, default=5,
                   help="minimum interactions per user and per item (default: 5)")
    p.add_argument("--image-dir", default=None,
                   help="folder with local images <item_id>.<ext> to count (not copied)")

    p = sub.add_parser("movielens", parents=[common], help="raw MovieLens (100k, 1m, 10m, latest, 20m, 25m, 32m)",
                       description="Convert a raw MovieLens folder. " + _MOVIELENS_HELP + ".")
    p.add_argument("--src", required=True, help="unpacked MovieLens folder")
    p.add_argument("--name", required=True, help="dataset name, e.g. ml-1m")
    p.add_argument("--out", required=True, help="output parent folder, e.g. dataset/")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.source == "ninerec":
            summary = convert_ninerec(args.src, args.out, name=args.name,
                                      benchmark=not args.no_benchmark,
                                      max_history=args.max_history)
        elif args.source == "amazon":
            summary = convert_amazon(args.reviews, args.meta, args.out, args.name,
                                     kcore=args.kcore, image_dir=args.image_dir)
        else:
            summary = convert_movielens(args.src, args.out, args.name)
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 1
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
