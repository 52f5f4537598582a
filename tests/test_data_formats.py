"""Reading interaction files: each format, and each kind of bad input named in the error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsl_dist.data import DataError, read_interactions


def test_lightgcn_text_with_empty_users_blank_lines_and_odd_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("0 5 7\n1\n\n  2\t5  \r\n3 9\n")
    table = read_interactions(path)
    assert table.column_names == ["user", "item"]
    assert table["user"].to_pylist() == [0, 0, 2, 3]
    assert table["item"].to_pylist() == [5, 7, 5, 9]
    assert table.schema.field("user").type == table.schema.field("item").type == pa.int64()


def test_csv_with_renamed_ids_and_optional_columns(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("uid,iid,timestamp,weight,other\n10,3,100,1.5,a\n11,4,90,2,b\n")
    table = read_interactions(path, user_col="uid", item_col="iid")
    assert table.column_names == ["user", "item", "timestamp", "weight"]
    assert table.to_pydict() == {"user": [10, 11], "item": [3, 4], "timestamp": [100, 90],
                                 "weight": [1.5, 2.0]}
    assert [f.type for f in table.schema] == [pa.int64(), pa.int64(), pa.int64(), pa.float32()]


def test_parquet_takes_integer_ids_of_any_type(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"user": pa.array([1, 2], pa.int32()), "item": [3.0, 4.0],
                             "extra": ["a", "b"]}), path)
    table = read_interactions(path)
    assert table.to_pydict() == {"user": [1, 2], "item": [3, 4]}
    assert table.schema.field("item").type == pa.int64()


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "missing.txt: no such file"),
    ("x.json", "{}", r"x.json: unknown format '.json'"),
    ("x.csv", "", "x.csv: cannot be read"),
    ("x.csv", "user,product\n1,2\n",
     r"x.csv: missing column\(s\) \['item'\]; the file has \['user', 'product'\]"),
    ("x.csv", "user,item\n", "x.csv: no interactions"),
    ("x.txt", "\n \n3\n", "x.txt: no interactions"),
    ("x.csv", "user,item\n1,2\n1,-2\n", "x.csv row 2: column 'item' has a negative id -2"),
    ("x.csv", "user,item\n1,3.5\n", "x.csv row 1: column 'item' has '3.5', not an integer id"),
    ("x.csv", "user,item\n1,2\nabc,3\n", "x.csv row 2: column 'user' has 'abc', not an integer"),
    ("x.csv", "user,item\n1,\n", "x.csv row 1: column 'item' has an empty value"),
    ("x.csv", "user,item,timestamp\n1,2,noon\n", "x.csv: column 'timestamp' is not int64"),
    ("x.txt", "0 1 2\n\n1 x 3\n", "x.txt:3: item has 'x', not an integer id"),
    ("x.txt", "0 1 2\n1.0 3\n", "x.txt:2: user has '1.0', not an integer id"),
    ("x.txt", "0 1 2\n1 3,4\n", "x.txt:2: item has '3,4', not an integer id"),
    ("x.txt", "0 1 99999999999999999999\n", "x.txt:1: item has '9+', not an integer id"),
    ("x.txt", "0 1\n-4 2\n", "x.txt:2: user has a negative id -4"),
])
def test_bad_input_is_named(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_interactions(path)


@pytest.mark.parametrize("column, message", [
    (pa.array([1.0, 2.5]), "x.parquet row 2: column 'user' has '2.5', not an integer id"),
    (pa.array([1, None]), "x.parquet row 2: column 'user' has an empty value"),
    (pa.array([[1], [2]]), "x.parquet: column 'user' has type list<"),
    (pa.array([1, 2**63], pa.uint64()), "x.parquet: column 'user': .*not in range"),
])
def test_bad_parquet_ids_are_named(tmp_path: Path, column: pa.Array, message: str) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"user": column, "item": [3, 4]}), path)
    with pytest.raises(DataError, match=message):
        read_interactions(path)


def test_unreadable_files_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="x.parquet: cannot be read"):
        read_interactions(tmp_path / "x.parquet")
    (tmp_path / "x.txt").write_bytes(b"0 1\xff\n")
    with pytest.raises(DataError, match="x.txt: not a text file"):
        read_interactions(tmp_path / "x.txt")
