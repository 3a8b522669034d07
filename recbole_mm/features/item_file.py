"""A dataset's ``.item`` file as extraction reads it: the item id column and the item tokens
(text features read their fields from it, image features their tokens and image paths)."""

from __future__ import annotations

from recbole_mm.data.atomic_file import read_atomic_file

# the one atomic-file reader (RecBole's quoting): a title reaches the encoder as RecBole holds it
_read_atomic_file = read_atomic_file


def _id_column(df, types, id_field, path):
    if id_field is not None:
        if id_field not in df.columns:
            raise ValueError(f"{path}: unknown id column {id_field!r}; available columns: {list(df.columns)}")
        return id_field
    if "item_id" in df.columns:
        return "item_id"
    for col in df.columns:
        if types[col] == "token":
            return col
    raise ValueError(f"{path}: no item id column found; pass id_field (columns: {list(df.columns)})")


def _item_tokens(df, id_col, path) -> list:
    ids = df[id_col]
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ValueError(f"{path}: duplicate item ids in column {id_col!r}: {dup.unique()[:5].tolist()} "
                         f"({len(dup)} duplicate rows); each item must appear once")
    return ids.tolist()
