"""Check RecBole atomic files before RecBole loads them.

RecBole 1.2.1 reads atomic files in ``Dataset._load_feat``: it splits the first line on
``field_separator``, splits every header field on ``:`` into ``name`` and a
:class:`~recbole.utils.enum_type.FeatureType` (``token``, ``token_seq``, ``float``,
``float_seq``), then hands the file to ``pandas.read_csv(engine="python")`` with ``float`` columns
as ``float64``. A malformed file therefore ends in a traceback from deep inside RecBole or pandas
(``not enough values to unpack``, ``Unable to convert column b:float to type float64``,
``UnicodeDecodeError``, ...) that names neither the file nor the fix, or, worse, loads wrong data
silently (rows with one field more than the header make pandas use the first column as index and
shift every column by one).

:func:`check_atomic_files` runs the same file selection and the same parsing rules on the files
RecBole is about to load and raises one :class:`DataFileError` that names the file, the line and
column, and the fix. It streams the files (a byte-level numpy scan for line structure and
encoding, pandas in chunks for the ``float`` columns), so it stays fast on files with millions of
rows. :func:`read_atomic_header` is the header parser on its own.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import os
import re
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

__all__ = ["DataFileError", "check_atomic_files", "read_atomic_header", "FEATURE_TYPES", "ATOMIC_DOC"]

ATOMIC_DOC = "https://recbole.io/docs/user_guide/data/atomic_files.html"
FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")

_CHUNK_BYTES = 8 << 20      # bytes per read in the byte-level scans
_CHUNK_ROWS = 1_000_000     # rows per pandas chunk in the float check
_SHOW = 60                  # characters of a value or line quoted in a message

# Type names people write by habit -> the RecBole type meant.
_TYPE_HINTS = {
    "str": "token", "string": "token", "text": "token", "id": "token", "category": "token",
    "categorical": "token", "cat": "token", "object": "token", "int": "float", "integer": "float",
    "int64": "float", "long": "float", "double": "float", "float64": "float", "number": "float",
    "numeric": "float", "num": "float", "real": "float", "timestamp": "float", "time": "float",
    "list": "token_seq", "seq": "token_seq", "tokens": "token_seq", "token_list": "token_seq",
    "tokenseq": "token_seq", "floatseq": "float_seq", "float_list": "float_seq", "vector": "float_seq",
}


class DataFileError(ValueError):
    """A RecBole atomic file (or the dataset folder) that RecBole could not load correctly.

    ``path``, ``line`` (1-based, the header is line 1), ``column`` (the column name, or ``None``),
    ``problem`` and ``fix`` are kept as attributes; ``str(error)`` joins them into one message.
    """

    def __init__(self, path: str, problem: str, fix: str | None = None, line: int | None = None,
                 column: str | None = None):
        self.path, self.problem, self.fix, self.line, self.column = path, problem, fix, line, column
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        message = f"{where}: {problem}"
        if fix:
            message += f"\n  Fix: {fix}"
        message += f"\n  (RecBole atomic file format: {ATOMIC_DOC})"
        super().__init__(message)

    def __reduce__(self):  # picklable across processes (DDP ranks, study workers)
        return (type(self), (self.path, self.problem, self.fix, self.line, self.column))


# --------------------------------------------------------------------------- config handling

def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a RecBole Config or a plain dict; ``default`` when the key is absent."""
    try:
        if key not in config:
            return default
        return config[key]
    except (KeyError, TypeError):
        return default


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _columns_for(config: Any, source: str) -> tuple[set | None, set | None]:
    """RecBole's ``_get_load_and_unload_col``: (None = all | set of names, set | None)."""
    load = _get(config, "load_col", None)
    if load is None:
        load_col = None
    elif source not in load:
        load_col = set()
    elif load[source] == "*":
        load_col = None
    else:
        load_col = set(load[source] or ())
    unload = _get(config, "unload_col", None)
    unload_col = set(unload[source] or ()) if unload is not None and source in unload else None
    return load_col, unload_col


def _short(text: str, limit: int = _SHOW) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _sep_name(sep: str) -> str:
    return {"\t": "tab", ",": "comma", ";": "semicolon", " ": "space", "|": "pipe"}.get(sep, repr(sep))


def _esc(text: str) -> str:
    """``text`` with tabs and other control characters written as escapes, for messages."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# --------------------------------------------------------------------------- encoding

def _ascii_compatible(encoding: str) -> bool:
    """True when tab, newline, quote and ASCII text encode to the same single bytes."""
    try:
        return "a\t\n\",;| :".encode(encoding) == b"a\t\n\",;| :"
    except (LookupError, UnicodeError):
        return False


def _check_encoding_name(path: str, encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataFileError(path, f"unknown encoding '{encoding}' (config 'encoding')",
                            "set 'encoding' to a Python codec name such as utf-8 or latin-1") from None


def _decode_error(path: str, encoding: str, offset: int, line: int, col: int | None,
                  bad: bytes, reason: str, line_bytes: bytes | None) -> DataFileError:
    where = f"byte {col} of the line (byte offset {offset} in the file)" if col is not None \
        else f"byte offset {offset} in the file"
    shown = ""
    if line_bytes is not None:
        shown = f"; the line reads {_short(line_bytes.decode(encoding, errors='replace'))!r}"
    return DataFileError(
        path,
        f"bytes {bad!r} at {where} are not valid {encoding} ({reason}){shown}",
        f"convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`), or set "
        f"`encoding:` in the config to the file's real encoding (e.g. `encoding: latin-1`)",
        line=line)


def _locate_decode_error(path: str, encoding: str) -> DataFileError | None:
    """Stream the whole file through an incremental decoder; the first undecodable bytes, or None."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    ascii_ok = _ascii_compatible(encoding)
    fed = 0              # bytes handed to the decoder so far
    newlines = 0         # newlines decoded so far
    last_nl = -1         # file offset of the last b"\n" before `fed` (ASCII-compatible encodings)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            final = not chunk
            pending = decoder.getstate()[0]
            try:
                text = decoder.decode(chunk, final)
            except UnicodeDecodeError as e:
                data = pending + chunk
                offset = fed - len(pending) + e.start
                good = data[:e.start]
                good_text = codecs.getincrementaldecoder(encoding)(errors="replace").decode(good, True)
                line = newlines + good_text.count("\n") + 1
                col = line_bytes = None
                if ascii_ok:
                    i = good.rfind(b"\n")
                    line_start = (fed - len(pending) + i + 1) if i >= 0 else last_nl + 1
                    col = offset - line_start + 1
                    f.seek(line_start)
                    line_bytes = f.read(min(offset - line_start + 200, 1 << 16)).split(b"\n", 1)[0]
                bad = e.object[e.start:max(e.end, e.start + 1)][:8]
                return _decode_error(path, encoding, offset, line, col, bad, e.reason, line_bytes)
            newlines += text.count("\n")
            if ascii_ok:
                i = chunk.rfind(b"\n")
                if i >= 0:
                    last_nl = fed + i
            fed += len(chunk)
            if final:
                return None


# --------------------------------------------------------------------------- header

def read_atomic_header(path: str, sep: str = "\t", encoding: str | None = "utf-8") -> list[tuple[str, str]]:
    """The ``(name, type)`` pairs of an atomic file's header, parsed exactly as RecBole does.

    Raises :class:`DataFileError` for an empty file, a header that RecBole cannot parse (a column
    without ``:type``, more than one ``:``, an unknown type, a comma- or space-separated header), a
    UTF-8 byte-order mark, or undecodable bytes.
    """
    path = os.fspath(path)
    sep = _or(sep, "\t")
    encoding = _or(encoding, "utf-8")
    _check_encoding_name(path, encoding)
    if os.path.getsize(path) == 0:
        raise DataFileError(path, "the file is empty (0 bytes)",
                            "write a header line of name:type columns separated by "
                            f"{_sep_name(sep)}s, e.g. 'user_id:token{_esc(sep)}item_id:token', then "
                            "one line per row", line=1)
    try:
        with open(path, "r", encoding=encoding) as f:  # universal newlines, as RecBole
            head = f.readline()
    except UnicodeDecodeError:
        err = _locate_decode_error(path, encoding)
        if err is not None:
            raise err from None
        raise
    head = head[:-1] if head.endswith("\n") else head
    fix_types = (f"every header field is name:type with type one of {', '.join(FEATURE_TYPES)}, e.g. "
                 f"'user_id:token{_esc(sep)}item_id:token{_esc(sep)}timestamp:float'")
    if head.startswith("\ufeff"):
        raise DataFileError(path, "the file starts with a byte-order mark (BOM); RecBole would read it "
                            "as part of the first column's name", "save the file without BOM (e.g. "
                            "`sed -i '1s/^\\xEF\\xBB\\xBF//' FILE`) or set `encoding: utf-8-sig`", line=1)
    if not head.strip():
        raise DataFileError(path, "the first line (the header) is empty", fix_types, line=1)
    fields = head.split(sep)
    if len(fields) == 1 and sep not in head:
        for other in (",", ";", "\t", "|", " "):
            if other != sep and other in head and head.count(":") > 1:
                raise DataFileError(
                    path, f"the header {_short(head)!r} has no {_sep_name(sep)} but "
                    f"{head.count(other)} {_sep_name(other)}s: the file looks {_sep_name(other)}"
                    f"-separated, but RecBole atomic files are {_sep_name(sep)}-separated "
                    f"(field_separator={sep!r})",
                    f"rewrite the file with {_sep_name(sep)}s between fields (e.g. "
                    f"`pandas.read_csv(IN, sep={other!r}).to_csv(OUT, sep={sep!r}, index=False)`), or set "
                    f"`field_separator: {other!r}` in the config", line=1)
    out: list[tuple[str, str]] = []
    for i, field in enumerate(fields, 1):
        parts = field.split(":")
        label = f"header field {i} ({_short(field)!r})"
        if len(parts) == 1:
            raise DataFileError(
                path, f"{label} has no ':type'; RecBole needs name:type for every column, "
                f"including columns it does not load", f"write it as '{field.strip() or 'name'}:token' "
                f"(or :float, :token_seq, :float_seq); {fix_types}", line=1, column=field.strip())
        if len(parts) > 2:
            raise DataFileError(path, f"{label} has more than one ':'",
                                f"use exactly one ':' between name and type; {fix_types}", line=1,
                                column=parts[0])
        name, ftype = parts
        if ftype not in FEATURE_TYPES:
            raise DataFileError(path, f"{label} has unknown type '{ftype}'",
                                f"use {_suggest_type(ftype)}", line=1, column=name)
        out.append((name, ftype))
    return out


def _suggest_type(ftype: str) -> str:
    clean = ftype.strip().lower()
    if clean in FEATURE_TYPES:
        guess = clean
        why = " (types are lower case, without spaces)" if clean != ftype else ""
    else:
        guess = _TYPE_HINTS.get(clean) or next(iter(difflib.get_close_matches(clean, FEATURE_TYPES, 1)), None)
        why = ""
    types = ", ".join(FEATURE_TYPES)
    if guess:
        return f"'{guess}'{why}; RecBole types are {types} (ids and categories: token, numbers: float)"
    return f"one of {types} (ids and categories: token, numbers: float)"


# --------------------------------------------------------------------------- line structure

def _row_count_error(path: str, line: int, nfields: int, ncols: int, sep: str, text: str,
                     quoted: bool) -> DataFileError:
    hint = []
    body = text.rstrip("\r\n")
    if nfields == ncols + 1 and body.endswith(sep):
        hint.append(f"the line ends with a {_sep_name(sep)}: remove the trailing separator (pandas "
                    "would otherwise take the first column as an index and shift every column)")
    if nfields < ncols and sep != " " and " " in body and sep not in body:
        hint.append(f"the values look space-separated; separate them with {_sep_name(sep)}")
    if quoted:
        hint.append("the file contains double quotes: a value starting with '\"' is read as a "
                    "quoted field that runs to the next '\"' (even across lines): remove or balance "
                    "the double quotes")
    hint.append(f"give every line exactly {ncols} {_sep_name(sep)}-separated fields (an empty value "
                f"is nothing between two separators)")
    return DataFileError(
        path, f"the line has {nfields} field{'s' * (nfields != 1)} but the header has {ncols}: "
        f"'{_short(_esc(body))}'", "; ".join(hint), line=line)


def _scan_bytes(path: str, ncols: int, sep: str) -> tuple[int, int, bool]:
    """Byte-level check that every data line has ``ncols`` fields (ASCII-compatible encoding,
    one-character separator). Returns (data rows, skipped blank lines, quote seen). Stops checking
    at the first double quote (the caller then re-checks with a quote-aware parser)."""
    sepb = sep.encode("ascii")[0]
    rows = blanks = 0
    line_base = 0          # physical lines before `buf`
    carry = b""
    first = True
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            final = not chunk
            buf = carry + chunk
            if not final:
                cut = buf.rfind(b"\n")
                if cut < 0:
                    carry = buf
                    continue
                carry, buf = buf[cut + 1:], buf[:cut + 1]
            else:
                carry = b""
            if first:  # skip the header line
                first = False
                cut = buf.find(b"\n")
                if cut < 0:
                    return 0, 0, False
                buf = buf[cut + 1:]
                line_base = 1
            if buf:
                if b'"' in buf:
                    return rows, blanks, True
                arr = np.frombuffer(buf, dtype=np.uint8)
                ends = np.flatnonzero(arr == 10)
                if not buf.endswith(b"\n"):
                    ends = np.append(ends, len(buf))
                starts = np.empty_like(ends)
                starts[0] = 0
                starts[1:] = ends[:-1] + 1
                seppos = np.flatnonzero(arr == sepb)
                counts = np.bincount(np.searchsorted(ends, seppos), minlength=len(ends))
                lengths = ends - starts
                bad = np.flatnonzero((counts != ncols - 1) | (lengths <= 1))
                nblank = 0
                for i in bad.tolist():
                    s, e = int(starts[i]), int(ends[i])
                    if counts[i] == 0 and not buf[s:e].strip():
                        nblank += 1
                        continue
                    if counts[i] == ncols - 1:
                        continue
                    raise _row_count_error(path, line_base + i + 1, int(counts[i]) + 1, ncols, sep,
                                           buf[s:e].decode("latin-1"), False)
                rows += len(ends) - nblank
                blanks += nblank
                line_base += len(ends)
            if final:
                return rows, blanks, False


def _blank(row: list[str]) -> bool:
    """pandas' python parser drops empty rows and rows of one whitespace-only field."""
    return len(row) == 0 or (len(row) == 1 and not row[0].strip())


def _iter_text_rows(path: str, sep: str, encoding: str) -> Iterator[tuple[int, list[str], str]]:
    """(first physical line, fields, raw text) of every data row, split the way RecBole's
    ``pandas.read_csv(engine="python")`` splits it; blank rows skipped. csv errors -> DataFileError."""
    with open(path, "r", encoding=encoding, newline="") as f:
        if len(sep) == 1:
            reader = csv.reader(f, delimiter=sep, quotechar='"', doublequote=True, escapechar=None,
                                skipinitialspace=False, quoting=csv.QUOTE_MINIMAL,
                                lineterminator="\n", strict=True)
            prev = 0
            try:
                for row in reader:
                    start, prev = prev + 1, reader.line_num
                    if start == 1:
                        continue  # header
                    if not _blank(row):
                        yield start, row, sep.join(row)
            except csv.Error as e:
                if "end of data" in str(e) or "new-line character seen" in str(e):
                    problem = (f"a value that starts with '\"' on this line is never closed: RecBole's "
                               f"parser reads it as one quoted field up to line {reader.line_num}")
                else:
                    problem = f"RecBole's parser (pandas, python engine) fails on this row: {e}"
                raise DataFileError(
                    path, problem, "a value starting with '\"' is read as a quoted field: remove the "
                    "double quotes, or quote the whole value and double the quotes inside it",
                    line=prev + 1) from None
        else:  # multi-character separators are regular expressions for pandas' python engine
            pat = re.compile(sep)
            for n, raw in enumerate(f, 1):
                if n == 1:
                    continue
                row = pat.split(raw.strip())
                if not _blank(row):
                    yield n, row, raw


def _scan_text(path: str, ncols: int, sep: str, encoding: str, quoted: bool) -> tuple[int, int]:
    rows = 0
    for line, row, raw in _iter_text_rows(path, sep, encoding):
        if len(row) != ncols:
            raise _row_count_error(path, line, len(row), ncols, sep, raw, quoted)
        rows += 1
    return rows, 0


def _data_row_line(path: str, k: int, sep: str, encoding: str, simple: bool) -> int:
    """Physical line of data row ``k`` (0-based, blank lines skipped)."""
    if simple:
        return k + 2
    for i, (line, _, _) in enumerate(_iter_text_rows(path, sep, encoding)):
        if i == k:
            return line
    return k + 2


# --------------------------------------------------------------------------- float values

def _python_float_ok(value: str) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _check_floats(path: str, header: list[tuple[str, str]], loaded: set[str], sep: str, seq_sep: str,
                  encoding: str, engine: str, simple_lines: bool) -> None:
    cols = [(n, t) for n, t in header if n in loaded and t in ("float", "float_seq")]
    if not cols:
        return
    usecols = [f"{n}:{t}" for n, t in cols]
    kw = dict(sep=sep, usecols=usecols, dtype=str, encoding=encoding, engine=engine, chunksize=_CHUNK_ROWS)
    if engine == "c" and all(t == "float" for _, t in cols):
        # Fast path: pandas' C parser converts the columns itself; only a failure (a value it cannot
        # read as a number) needs the value-by-value pass below, which also accepts what Python's
        # float() reads (RecBole's python engine falls back to it).
        try:
            for _ in pd.read_csv(path, **{**kw, "dtype": {k: np.float64 for k in usecols}}):
                pass
            return
        except (ValueError, pd.errors.ParserError):
            pass
    try:
        reader = pd.read_csv(path, **kw)
        for chunk in reader:
            for (name, ftype), key in zip(cols, usecols):
                s = chunk[key]
                if ftype == "float":
                    vals = s[s.notna()]
                    num = pd.to_numeric(vals, errors="coerce")
                    cand = vals[num.isna()]
                else:  # float_seq: RecBole does map(float, filter(None, value.split(seq_separator)))
                    vals = s.dropna()
                    if vals.empty:
                        continue
                    tok = vals.str.split(seq_sep, regex=False).explode()
                    tok = tok[tok.notna() & (tok != "")]
                    num = pd.to_numeric(tok, errors="coerce")
                    cand = tok[num.isna()]
                for idx, value in cand.items():
                    if _python_float_ok(value):
                        continue
                    k = int(idx)
                    line = _data_row_line(path, k, sep, encoding, simple_lines)
                    if ftype == "float":
                        problem = f"value {_short(value)!r} is not a number, but the column is typed float"
                        fix = (f"fix or empty the value (an empty value loads as NaN), or type the column "
                               f"'{name}:token' if it is a category/id")
                    else:
                        full = s.loc[idx]
                        problem = (f"'{_short(value)}' in {_short(full)!r} is not a number, but the column "
                                   f"is typed float_seq (numbers separated by seq_separator={seq_sep!r})")
                        fix = (f"write numbers separated by {seq_sep!r}, or type the column "
                               f"'{name}:token_seq' if it holds tokens")
                    raise DataFileError(path, problem, fix, line=line, column=name)
    except DataFileError:
        raise
    except (pd.errors.ParserError, ValueError, csv.Error) as e:
        raise DataFileError(path, f"pandas cannot parse the file: {e}",
                            f"check the file is {_sep_name(sep)}-separated with one header line") from None


# --------------------------------------------------------------------------- one file

def _check_file(path: str, source: str, config: Any, required: Iterable[tuple[str, str]],
                need_rows: bool) -> None:
    sep = _or(_get(config, "field_separator"), "\t")
    seq_sep = _or(_get(config, "seq_separator"), " ")
    encoding = _or(_get(config, "encoding"), "utf-8")
    load_col, unload_col = _columns_for(config, source)
    if load_col == set():  # RecBole does not open the file at all
        return
    header = read_atomic_header(path, sep, encoding)
    names = [n for n, _ in header]
    listed = ", ".join(repr(n) for n in names)
    if load_col is not None:
        missing = [c for c in sorted(load_col) if c not in names]
        if missing:
            raise DataFileError(
                path, f"load_col['{source}'] lists column{'s' * (len(missing) > 1)} "
                f"{', '.join(map(repr, missing))} that the header does not have (columns: {listed})",
                f"remove {', '.join(map(repr, missing))} from load_col['{source}'] in the config, or add "
                f"the column to the file", line=1, column=missing[0])

    def is_loaded(n: str) -> bool:
        return (load_col is None or n in load_col) and (unload_col is None or n not in unload_col)

    loaded = {n for n in names if is_loaded(n)}
    for key, field in required:
        if field is None:
            continue
        if field not in names:
            raise DataFileError(
                path, f"the id column '{field}' ({key}) is not in the header (columns: {listed})",
                f"name the column '{field}:token' in the header, or set {key} in the config to the "
                f"column that holds it", line=1, column=field)
        if field not in loaded:
            where = (f"add '{field}' to load_col['{source}']" if load_col is not None
                     else f"remove '{field}' from unload_col['{source}']")
            raise DataFileError(path, f"the id column '{field}' ({key}) is in the file but not loaded",
                                f"{where} in the config", line=1, column=field)
    seen: set[str] = set()
    for n in names:
        if n in loaded and n in seen:
            raise DataFileError(path, f"the header has column '{n}' twice",
                                "rename or remove one of them", line=1, column=n)
        seen.add(n)

    err = _locate_decode_error(path, encoding)
    if err is not None:
        raise err
    ncols = len(header)
    byte_level = len(sep) == 1 and sep.isascii() and _ascii_compatible(encoding)
    quoted = False
    if byte_level:
        rows, blanks, quoted = _scan_bytes(path, ncols, sep)
    if not byte_level or quoted:
        rows, blanks = _scan_text(path, ncols, sep, encoding, quoted)
    if need_rows and rows == 0:
        raise DataFileError(path, "the file has a header but no data rows",
                            "add the rows, one per line, below the header", line=2)
    # pandas' C parser splits like RecBole's python engine once the quoting passed the strict csv
    # check above; data row k is then line k + 2 unless quotes or blank lines shift it.
    _check_floats(path, header, loaded, sep, seq_sep, encoding, "c" if byte_level else "python",
                  byte_level and not quoted and blanks == 0)


# --------------------------------------------------------------------------- entry point

def _downloadable(name: str) -> bool:
    """Whether RecBole would download ``name`` when its folder is missing."""
    try:
        import yaml
        import recbole

        url_file = os.path.join(os.path.dirname(recbole.__file__), "properties", "dataset", "url.yaml")
        with open(url_file, encoding="utf-8") as f:
            return name in (yaml.safe_load(f) or {})
    except Exception:  # noqa: BLE001 - no recbole/yaml: nothing is downloadable
        return False


def check_atomic_files(config: Any) -> list[str]:
    """Check the atomic files RecBole will load for ``config``; return the paths checked.

    ``config`` is a RecBole ``Config`` (its ``data_path`` already ends in the dataset's folder) or a
    plain dict with the same keys. Files are selected as RecBole 1.2.1 does: ``<name>.inter`` (or
    ``<name>.<part>.inter`` for every part of ``benchmark_filename``) must exist; ``<name>.user`` and
    ``<name>.item`` are checked when they exist and ``load_col`` loads them; every
    ``additional_feat_suffix`` file must exist. Raises :class:`DataFileError` on the first problem.
    A missing folder of a dataset RecBole can download is left to RecBole.
    """
    name = _get(config, "dataset")
    folder = _get(config, "data_path")
    if folder is None:
        raise DataFileError("<config>", "the config has no data_path",
                            "set data_path to the folder that holds the dataset's folder")
    folder = os.fspath(folder)
    if name is None:
        name = os.path.basename(os.path.normpath(folder))
    fix_place = (f"check `data_path` (the folder that contains the '{name}' folder) and the dataset "
                 f"name '{name}': RecBole reads <data_path>/{name}/{name}.inter")
    if not os.path.isdir(folder):
        if _downloadable(name):
            return []
        raise DataFileError(folder, f"the dataset folder for '{name}' does not exist", fix_place)

    inter_required = [("USER_ID_FIELD", _get(config, "USER_ID_FIELD", "user_id")),
                      ("ITEM_ID_FIELD", _get(config, "ITEM_ID_FIELD", "item_id"))]
    parts = _get(config, "benchmark_filename")
    inter_files = ([os.path.join(folder, f"{name}.inter")] if parts is None
                   else [os.path.join(folder, f"{name}.{p}.inter") for p in parts])
    checked = []
    for path in inter_files:
        if not os.path.isfile(path):
            present = sorted(f for f in os.listdir(folder) if not f.startswith("."))
            shown = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "")
            extra = f" and benchmark_filename {list(parts)}" if parts is not None else ""
            raise DataFileError(path, "the interaction file does not exist (files in the folder: "
                                f"{shown or 'none'})", fix_place + extra)
        if _columns_for(config, "inter")[0] == set():
            raise DataFileError(path, "load_col has no 'inter' entry, so RecBole would load no "
                                "interactions", "add e.g. `inter: [user_id, item_id, timestamp]` to load_col")
        _check_file(path, "inter", config, inter_required, need_rows=True)
        checked.append(path)

    for source, key, default in (("user", "USER_ID_FIELD", "user_id"), ("item", "ITEM_ID_FIELD", "item_id")):
        path = os.path.join(folder, f"{name}.{source}")
        if not os.path.isfile(path) or _columns_for(config, source)[0] == set():
            continue
        field = _get(config, key, default)
        if field is None:
            raise DataFileError(path, f"{key} is not set but the .{source} file is loaded",
                                f"set {key} in the config, or leave '{source}' out of load_col")
        _check_file(path, source, config, [(key, field)], need_rows=False)
        checked.append(path)

    for suffix in _get(config, "additional_feat_suffix") or ():
        path = os.path.join(folder, f"{name}.{suffix}")
        if not os.path.isfile(path):
            raise DataFileError(path, f"the additional feature file (additional_feat_suffix "
                                f"'{suffix}') does not exist",
                                f"create it or remove '{suffix}' from additional_feat_suffix")
        _check_file(path, suffix, config, [], need_rows=False)
        checked.append(path)
    return checked
