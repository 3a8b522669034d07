"""The one reader of RecBole atomic files (``.inter`` / ``.item`` / ``.user``) for the plugin's own use.

RecBole reads atomic files with ``pandas.read_csv(sep="\\t")`` and pandas' default quoting: a field
that starts with ``"`` is a quoted field (``""`` inside is one quote, tabs and newlines may occur),
anything else is taken as it is. Every part of the plugin that reads these files besides RecBole
(text-feature extraction, ``inspect``, the converters' round trip, SICSRec's stage 1) reads them
here, the same way, so a title reaches the text encoder exactly as RecBole's dataset holds it; the
converters write with the matching writer (``csv.QUOTE_MINIMAL``, :mod:`recbole_mm.data.convert`).
"""

import os

import pandas as pd


def read_atomic_file(path):
    """``(df, types)``: the file's columns as strings (empty values stay ``""``, nothing is read as
    NaN), named by their field names without the type, and ``{name: type}`` (``token`` when the
    header gives none)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"atomic file {path} not found")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8",
                         header=0)
    except pd.errors.ParserError as exc:
        raise ValueError(
            f"{path}: {exc}. A field that starts with a double quote is read as a quoted field (as RecBole "
            f"reads it), so it must end with one, with any quote inside doubled (\"\"). Rewrite the file "
            f"with csv.QUOTE_MINIMAL (e.g. pandas to_csv(sep='\\t', index=False)), or remove the opening "
            f"quote") from None
    names, types = [], {}
    for col in df.columns:
        short, _, ftype = str(col).partition(":")
        names.append(short)
        types[short] = ftype or "token"
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate column names {names}")
    df.columns = names
    return df, types
