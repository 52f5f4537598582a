"""Preparing a data set: id remapping, shards and manifest, determinism, no clobbering, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from dsl_dist.data import DataError, Manifest
from dsl_dist.data.manifest import verify_shard
from dsl_dist.data.prepare import prepare_dataset, split_interactions


def read_split(dataset: Path, manifest: Manifest, split: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(dataset / s.path) for s in manifest.splits[split].shards)


def test_ids_are_remapped_and_mappings_kept(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("user,item\n100,7\n5,7\n100,42\n5,9\n")
    (tmp_path / "test.csv").write_text("user,item\n5,42\n")
    out = tmp_path / "ds"
    manifest = prepare_dataset({"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"},
                               out, name="toy", num_shards=2)
    assert (manifest.num_users, manifest.num_items) == (2, 3)
    users = dict(zip(*pq.read_table(out / "user_map.parquet").to_pydict().values()))
    items = dict(zip(*pq.read_table(out / "item_map.parquet").to_pydict().values()))
    assert users == {5: 0, 100: 1} and items == {7: 0, 9: 1, 42: 2}
    train = read_split(out, manifest, "train")
    pairs = sorted(zip(train["user"].to_pylist(), train["item"].to_pylist()))
    assert pairs == sorted([(1, 0), (0, 0), (1, 2), (0, 1)])
    assert read_split(out, manifest, "test").to_pydict() == {"user": [0], "item": [2]}
    assert Manifest.load(out) == manifest


def test_preparation_is_deterministic(clustered_source: Path, tmp_path: Path) -> None:
    files = {"train": clustered_source / "train.txt", "test": clustered_source / "test.txt"}
    a = prepare_dataset(files, tmp_path / "a", name="c", num_shards=3, rows_per_group=50)
    b = prepare_dataset(files, tmp_path / "b", name="c", num_shards=3, rows_per_group=50)
    assert a == b
    for shard in a.splits["train"].shards:
        assert (tmp_path / "a" / shard.path).read_bytes() == (tmp_path / "b" / shard.path).read_bytes()
    assert len(a.splits["train"].shards) == 3
    assert pq.ParquetFile(tmp_path / "a" / a.splits["train"].shards[0].path).num_row_groups > 1


def test_existing_data_set_is_not_replaced(clustered_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    files = {"train": clustered_source / "train.txt"}
    first = prepare_dataset(files, out, name="c")
    with pytest.raises(DataError, match="already exists"):
        prepare_dataset(files, out, name="c")
    with pytest.raises(DataError, match="no such file"):
        prepare_dataset({"train": tmp_path / "nope.txt"}, out, name="c", overwrite=True)
    assert Manifest.load(out) == first, "a failed preparation must leave the old data set"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_checksum_and_missing_shard_are_detected(clustered_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = prepare_dataset({"train": clustered_source / "train.txt"}, out, name="c")
    shard = manifest.splits["train"].shards[1]
    verify_shard(out, shard)
    data = bytearray((out / shard.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / shard.path).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard.path}: corrupt shard"):
        verify_shard(out, shard)
    (out / shard.path).unlink()
    with pytest.raises(DataError, match="is missing"):
        Manifest.load(out)


def test_missing_manifest_suggests_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="python -m dsl_dist.data.prepare"):
        Manifest.load(tmp_path)


def test_split_interactions_holds_out_latest_per_user() -> None:
    table = pa.table({"user": [0] * 10 + [1] * 5, "item": list(range(10)) + list(range(5)),
                      "timestamp": list(range(10, 0, -1)) + list(range(5))})
    parts = split_interactions(table, test_fraction=0.2, seed=0)
    test = parts["test"].to_pydict()
    # user 0: timestamps decrease with item, so the latest are items 0 and 1; user 1: item 4
    assert sorted(zip(test["user"], test["item"])) == [(0, 0), (0, 1), (1, 4)]
    assert parts["train"].num_rows == 12


def test_cli_summary_and_errors(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dsl_dist.data.prepare", *args],
                              capture_output=True, text=True)

    pq.write_table(pa.table({"user": [1, 1, 2, 2, 3], "item": [1, 2, 3, 4, 5]}),
                   tmp_path / "all.parquet")
    ok = cli("--interactions", str(tmp_path / "all.parquet"), "--test-fraction", "0.5",
             "--out", str(tmp_path / "ds"))
    assert ok.returncode == 0, ok.stderr
    assert "3 users, 5 items" in ok.stdout
    bad = cli("--train", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "other"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nope.csv" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.skipif(not (SHARED_DATA / "lastfm").is_dir(), reason="shared data not present")
def test_real_lastfm_counts(tmp_path: Path) -> None:
    source = SHARED_DATA / "lastfm"
    manifest = prepare_dataset({s: source / f"{s}.txt" for s in ("train", "valid", "test")},
                               tmp_path / "lastfm", name="lastfm")
    for split in ("train", "valid", "test"):
        lines = (source / f"{split}.txt").read_text().split("\n")
        assert manifest.splits[split].rows == sum(len(line.split()) - 1 for line in lines if line)
    raw_users = {int(line.split()[0]) for s in ("train", "valid", "test")
                 for line in (source / f"{s}.txt").read_text().splitlines() if line.strip()}
    assert manifest.num_users == len(raw_users)
