"""Readers for interaction files: LightGCN text, CSV and Parquet, into one Arrow schema.

Every reader hands its id columns to `_ids` together with a function that names the position
of a value in the file (`train.txt:12`, `x.csv row 3`), so that all formats reject the same bad
ids (empty, fractional, text, negative) with a message that points at the offending value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dsl_dist.data.errors import DataError

FORMATS = (".txt", ".csv", ".parquet")
OPTIONAL_COLUMNS = {"timestamp": pa.int64(), "weight": pa.float32()}
# Decimal and below 10**18, so that every match fits an int64; the sign is checked afterwards
# to give negative ids their own message.
ID_PATTERN = r"^-?[0-9]{1,18}$"

Position = Callable[[int], str]
"""Where element i of an id column sits in its file, appended to the path: ":12", " row 3"."""


def read_interactions(path: Path, user_col: str = "user", item_col: str = "item") -> pa.Table:
    """(user int64, item int64[, timestamp int64][, weight float32]) rows of one file.

    The format follows the extension; `user_col`/`item_col` name the id columns of CSV and
    Parquet files (LightGCN text has no column names).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".txt":
        table = _read_lightgcn(path)
    elif path.suffix in (".csv", ".parquet"):
        table = _read_tabular(path, user_col, item_col)
    else:
        raise DataError(f"{path}: unknown format {path.suffix!r}; expected one of {FORMATS}")
    if table.num_rows == 0:
        raise DataError(f"{path}: no interactions")
    return table


def _ids(values: pa.Array, path: Path, what: str, position: Position) -> pa.Array:
    """`values` as int64 ids. Integer columns are taken as they are; anything else (text,
    floats) must read as a decimal integer, so 3.0 passes and 3.5 does not."""
    if pa.types.is_integer(values.type):
        valid = pc.is_valid(values)
    else:
        try:
            values = pc.cast(values, pa.string())
        except pa.ArrowNotImplementedError:
            raise DataError(f"{path}: {what} has type {values.type}, not integer ids") from None
        valid = pc.fill_null(pc.match_substring_regex(values, ID_PATTERN), False)
    i = pc.index(valid, False).as_py()
    if i >= 0:
        value = values[i].as_py()
        shown = "an empty value" if value in (None, "") else repr(value)
        raise DataError(f"{path}{position(i)}: {what} has {shown}, not an integer id "
                        "(decimal, below 10**18)")
    try:
        ids = pc.cast(values, pa.int64())
    except pa.ArrowInvalid as exc:  # an unsigned id beyond the int64 range
        raise DataError(f"{path}: {what}: {exc}") from None
    i = pc.index(pc.less(ids, 0), True).as_py()
    if i >= 0:
        raise DataError(f"{path}{position(i)}: {what} has a negative id {ids[i].as_py()}")
    return ids


def _read_lightgcn(path: Path) -> pa.Table:
    """`user item item ...` per line, split on any whitespace; a user may have no items."""
    try:
        lines = pa.array(path.read_text().split("\n"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file ({exc})") from None
    split = pc.utf8_split_whitespace(lines)
    tokens, line_index = pc.list_flatten(split), pc.list_parent_indices(split)
    keep = pc.not_equal(pc.utf8_length(tokens), 0)  # runs of whitespace give empty tokens
    tokens = tokens.filter(keep)
    line_number = line_index.filter(keep).to_numpy() + 1
    is_user = np.r_[True, line_number[1:] != line_number[:-1]] if len(tokens) else np.zeros(0, bool)
    user_at, item_at = np.flatnonzero(is_user), np.flatnonzero(~is_user)
    users = _ids(tokens.take(user_at), path, "user", lambda i: f":{line_number[user_at[i]]}")
    items = _ids(tokens.take(item_at), path, "item", lambda i: f":{line_number[item_at[i]]}")
    line_of_item = np.cumsum(is_user)[item_at] - 1  # index into users
    return pa.table({"user": users.take(pa.array(line_of_item)), "item": items})


def _read_tabular(path: Path, user_col: str, item_col: str) -> pa.Table:
    """CSV (header row required) or Parquet; ids are read as text from CSV so that `_ids`
    sees what the file says rather than what type inference made of it."""
    try:
        if path.suffix == ".csv":
            as_text = pacsv.ConvertOptions(column_types={user_col: pa.string(),
                                                          item_col: pa.string()})
            raw = pacsv.read_csv(path, convert_options=as_text)
        else:
            raw = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read: {exc}") from None
    missing = [c for c in (user_col, item_col) if c not in raw.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {raw.column_names}")
    table = {name: _ids(raw[column].combine_chunks(), path, f"column {column!r}",
                        lambda i: f" row {i + 1}")
             for name, column in (("user", user_col), ("item", item_col))}
    for name, target in OPTIONAL_COLUMNS.items():
        if name not in raw.column_names:
            continue
        column = raw[name]
        if column.null_count:
            raise DataError(f"{path}: column {name!r} has {column.null_count} empty value(s)")
        try:
            table[name] = column.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"{path}: column {name!r} is not {target}: {exc}") from None
    return pa.table(table)
