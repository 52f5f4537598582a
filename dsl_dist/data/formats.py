"""Readers for interaction files: LightGCN text, CSV and Parquet, into one Arrow schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dsl_dist.data.errors import DataError

FORMATS = (".txt", ".csv", ".parquet")
OPTIONAL_COLUMNS = {"timestamp": pa.int64(), "weight": pa.float32()}


def read_interactions(path: Path, user_col: str = "user", item_col: str = "item") -> pa.Table:
    """(user int64, item int64[, timestamp int64][, weight float32]) rows of one file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".txt":
        table = _read_lightgcn(path)
    elif path.suffix in (".csv", ".parquet"):
        table = _read_columns(path, user_col, item_col)
    else:
        raise DataError(f"{path}: unknown format {path.suffix!r}; expected one of {FORMATS}")
    if table.num_rows == 0:
        raise DataError(f"{path}: no interactions")
    for column in ("user", "item"):
        if pc.min(table[column]).as_py() < 0:
            row = pc.index(pc.less(table[column], 0), True).as_py()
            raise DataError(f"{path}: negative {column} id {table[column][row].as_py()} "
                            f"(row {row})")
    return table


def _read_lightgcn(path: Path) -> pa.Table:
    """`user item item ...` per line; a user may have no items."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                ids = np.array([int(x) for x in fields], dtype=np.int64)
            except ValueError:
                bad = next(x for x in fields if not x.lstrip("-").isdigit())
                raise DataError(f"{path}:{number}: non-integer id {bad!r}") from None
            users.append(np.full(len(ids) - 1, ids[0]))
            items.append(ids[1:])
    if not users:
        return pa.table({"user": pa.array([], pa.int64()), "item": pa.array([], pa.int64())})
    return pa.table({"user": np.concatenate(users), "item": np.concatenate(items)})


def _read_columns(path: Path, user_col: str, item_col: str) -> pa.Table:
    try:
        raw = pacsv.read_csv(path) if path.suffix == ".csv" else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read: {exc}") from None
    missing = [c for c in (user_col, item_col) if c not in raw.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {raw.column_names}")
    columns = {"user": raw[user_col], "item": raw[item_col]}
    columns.update({c: raw[c] for c in OPTIONAL_COLUMNS if c in raw.column_names})
    table = {}
    for name, column in columns.items():
        target = OPTIONAL_COLUMNS.get(name, pa.int64())
        if column.null_count:
            raise DataError(f"{path}: column {name!r} has {column.null_count} empty value(s)")
        try:  # a safe cast refuses 3.5 or "abc" as an integer, naming the value
            table[name] = column.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"{path}: column {name!r} is not {target}: {exc}") from None
    return pa.table(table)
