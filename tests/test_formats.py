"""Reading interaction files: each format, and each kind of bad input named in the error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsl_dist.data import DataError
from dsl_dist.data.formats import read_interactions


def test_lightgcn_text(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("0 5 7\n1\n\n2 5\n")
    table = read_interactions(path)
    assert table["user"].to_pylist() == [0, 0, 2]
    assert table["item"].to_pylist() == [5, 7, 5]


def test_csv_with_optional_columns_and_renamed_ids(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("uid,iid,timestamp,weight\n10,3,100,1.5\n11,4,90,2\n")
    table = read_interactions(path, user_col="uid", item_col="iid")
    assert table.column_names == ["user", "item", "timestamp", "weight"]
    assert table["user"].to_pylist() == [10, 11] and table["weight"].to_pylist() == [1.5, 2.0]
    assert table.schema.field("user").type == pa.int64()


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"user": [1, 2], "item": [3, 4], "extra": ["a", "b"]}), path)
    assert read_interactions(path).column_names == ["user", "item"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "no such file"),
    ("x.json", "{}", "unknown format '.json'"),
    ("x.csv", "user,product\n1,2\n", r"missing column\(s\) \['item'\]; the file has \['user', 'product'\]"),
    ("x.csv", "user,item\n", "no interactions"),
    ("x.txt", "\n\n", "no interactions"),
    ("x.csv", "user,item\n1,-2\n", "negative item id -2"),
    ("x.csv", "user,item\n1,3.5\n", "column 'item' is not int64"),
    ("x.csv", "user,item\nabc,3\n", "column 'user' is not int64"),
    ("x.csv", "user,item\n1,\n", "column 'item' has 1 empty value"),
    ("x.txt", "0 1 2\n1 x 3\n", r"x.txt:2: non-integer id 'x'"),
])
def test_bad_input_is_named(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_interactions(path)
