"""Preparing a data set: id remapping, shards and manifest, determinism, no clobbering, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from dsl_dist.data import (DataError, Manifest, ensure_prepared, find_source_splits,
                           prepare_dataset, split_interactions, verify_shard)
from dsl_dist.data.prepare import main


def read_split(dataset: Path, split: str) -> pa.Table:
    manifest = Manifest.load(dataset)
    return pa.concat_tables(pq.read_table(dataset / s.path) for s in manifest.splits[split].shards)


def pairs(table: pa.Table) -> list[tuple[int, int]]:
    return list(zip(table["user"].to_pylist(), table["item"].to_pylist()))


def test_ids_are_remapped_in_sorted_order_and_mappings_kept(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("user,item\n100,7\n5,7\n100,42\n5,9\n")
    (tmp_path / "test.csv").write_text("user,item\n5,42\n100,8\n")  # item 8 only in test
    out = tmp_path / "ds"
    manifest = prepare_dataset({"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"},
                               out, name="toy", num_shards=2)
    assert (manifest.num_users, manifest.num_items) == (2, 4)
    user_map = pq.read_table(out / "user_map.parquet")
    item_map = pq.read_table(out / "item_map.parquet")
    assert user_map.schema.types == item_map.schema.types == [pa.int64(), pa.int64()]
    assert user_map.to_pydict() == {"raw": [5, 100], "index": [0, 1]}
    assert item_map.to_pydict() == {"raw": [7, 8, 9, 42], "index": [0, 1, 2, 3]}
    # Mapping the prepared ids back gives the raw interactions.
    raw_user, raw_item = user_map["raw"].to_pylist(), item_map["raw"].to_pylist()
    back = sorted((raw_user[u], raw_item[i]) for u, i in pairs(read_split(out, "train")))
    assert back == sorted([(100, 7), (5, 7), (100, 42), (5, 9)])
    assert pairs(read_split(out, "test")) == [(0, 3), (1, 1)]  # sorted by (user, item)


def test_contiguous_ids_stay_as_they_are(clustered_source: Path, tmp_path: Path) -> None:
    manifest = prepare_dataset(find_source_splits(clustered_source), tmp_path / "ds", name="c")
    lines = [line.split() for line in (clustered_source / "test.txt").read_text().splitlines()]
    raw = sorted((int(ws[0]), int(w)) for ws in lines for w in ws[1:])
    assert pairs(read_split(tmp_path / "ds", "test")) == raw  # same ids, sorted by (user, item)
    assert manifest.num_users == len(lines)


def test_shards_row_groups_and_shuffled_train(clustered_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = prepare_dataset(find_source_splits(clustered_source), out, name="c",
                               num_shards=3, rows_per_group=50, seed=7)
    source_train = read_split(out, "train")  # ids are contiguous already, so raw == prepared
    lines = (clustered_source / "train.txt").read_text().splitlines()
    expected = sorted((int(ws[0]), int(w)) for ws in map(str.split, lines) for w in ws[1:])
    assert sorted(pairs(source_train)) == expected
    assert pairs(source_train) != expected  # shuffled: not in file order
    train = manifest.splits["train"]
    assert [s.path for s in train.shards] == [f"train/part-0000{k}.parquet" for k in range(3)]
    assert sum(s.rows for s in train.shards) == train.rows == len(expected)
    assert {pq.ParquetFile(out / s.path).metadata.row_group(0).num_rows
            for s in train.shards} == {50}
    assert (manifest.schema_version, manifest.name, manifest.seed) == (1, "c", 7)
    (tmp_path / "tiny.txt").write_text("0 1 2\n1 3\n")
    tiny = prepare_dataset({"train": tmp_path / "tiny.txt"}, tmp_path / "tiny", name="t",
                           num_shards=5)
    assert [s.rows for s in tiny.splits["train"].shards] == [1, 1, 1]  # no empty shards


def test_preparation_is_deterministic(clustered_source: Path, tmp_path: Path) -> None:
    files = find_source_splits(clustered_source)
    a = prepare_dataset(files, tmp_path / "a", name="c", num_shards=3, rows_per_group=50)
    b = prepare_dataset(files, tmp_path / "b", name="c", num_shards=3, rows_per_group=50)
    c = prepare_dataset(files, tmp_path / "c", name="c", num_shards=3, rows_per_group=50, seed=1)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(names) == 3 + 3 + 3  # train and test shards, two maps, manifest
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a == b and a.splits["train"] != c.splits["train"]


def test_existing_data_set_is_not_replaced(clustered_source: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ds"
    files = {"train": clustered_source / "train.txt"}
    first = prepare_dataset(files, out, name="first")
    with pytest.raises(DataError, match="ds: already exists and is not empty; pass --overwrite"):
        prepare_dataset({"train": tmp_path / "nope.txt"}, out, name="second")  # checked first
    with pytest.raises(DataError, match="nope.txt: no such file"):
        prepare_dataset({"train": tmp_path / "nope.txt"}, out, name="second", overwrite=True)
    (clustered_source / "bad.txt").write_text("0 1\n1 x\n")
    with pytest.raises(DataError, match="bad.txt:2"):
        prepare_dataset({"train": clustered_source / "bad.txt"}, out, name="x", overwrite=True)
    with monkeypatch.context() as patch:  # fails half way through writing the new data set
        patch.setattr("dsl_dist.data.prepare.file_sha256", lambda path: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            prepare_dataset(files, out, name="x", overwrite=True)
    assert Manifest.load(out) == first, "a failed preparation must leave the old data set"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "source"], "no staging left"
    second = prepare_dataset(files, out, name="second", overwrite=True)
    assert Manifest.load(out) == second and second.name == "second"
    (tmp_path / "empty").mkdir()
    prepare_dataset(files, tmp_path / "empty", name="e")  # an empty directory may be filled
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="file: exists and is not a directory"):
        prepare_dataset(files, tmp_path / "file", name="f", overwrite=True)


def test_split_names_are_checked(clustered_source: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\['test'\]: need 'train'"):
        prepare_dataset({"test": clustered_source / "test.txt"}, tmp_path / "ds", name="c")
    with pytest.raises(DataError, match=r"\['train', 'valdi'\]: need 'train', and only"):
        prepare_dataset({"train": clustered_source / "train.txt",
                         "valdi": clustered_source / "test.txt"}, tmp_path / "ds", name="c")


def test_manifest_round_trip_and_its_errors(clustered_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = prepare_dataset(find_source_splits(clustered_source), out, name="c",
                               num_shards=2)
    assert Manifest.load(out) == manifest
    manifest.save(tmp_path)  # saving elsewhere and loading again gives an equal manifest
    assert json.loads((tmp_path / "manifest.json").read_text())["splits"]["test"]["rows"] == \
        manifest.splits["test"].rows
    raw = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(raw | {"schema_version": 99}))
    with pytest.raises(DataError, match="manifest.json: schema_version 99 is not 1"):
        Manifest.load(out)
    (out / "manifest.json").write_text("[]")
    with pytest.raises(DataError, match="manifest.json: malformed manifest"):
        Manifest.load(out)
    manifest.save(out)
    (out / manifest.splits["test"].shards[1].path).unlink()
    with pytest.raises(DataError, match="test/part-00001.parquet: shard listed in .* is missing"):
        Manifest.load(out)
    with pytest.raises(DataError, match="python -m dsl_dist.data.prepare"):
        Manifest.load(tmp_path / "nothing")


def test_checksum_mismatch_is_a_corrupt_shard(clustered_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = prepare_dataset({"train": clustered_source / "train.txt"}, out, name="c")
    shard = manifest.splits["train"].shards[1]
    verify_shard(out, shard)
    data = bytearray((out / shard.path).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / shard.path).write_bytes(bytes(data))
    with pytest.raises(DataError, match="train/part-00001.parquet: corrupt shard"):
        verify_shard(out, shard)


def test_find_source_splits(tmp_path: Path) -> None:
    for name in ("train.csv", "test.txt", "valid.parquet", "notes.txt"):
        (tmp_path / name).write_text("")
    assert find_source_splits(tmp_path) == {"train": tmp_path / "train.csv",
                                            "valid": tmp_path / "valid.parquet",
                                            "test": tmp_path / "test.txt"}
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(DataError, match=r"more than one train file: \['train.txt', 'train.csv'\]"):
        find_source_splits(tmp_path)
    (tmp_path / "eval_only").mkdir()
    (tmp_path / "eval_only" / "test.txt").write_text("")
    with pytest.raises(DataError, match="eval_only: no train file"):
        find_source_splits(tmp_path / "eval_only")


def test_split_interactions_holds_out_the_latest_per_user() -> None:
    table = pa.table({"user": [0] * 10 + [1] * 5 + [2],
                      "item": list(range(10)) + list(range(5)) + [0],
                      "timestamp": list(range(10, 0, -1)) + list(range(5)) + [0]})
    parts = split_interactions(table, test_fraction=0.2, valid_fraction=0.2, seed=0)
    # user 0: timestamps fall as items rise, so items 0, 1 are the latest and 2, 3 come next
    assert sorted(pairs(parts["test"])) == [(0, 0), (0, 1), (1, 4)]
    assert sorted(pairs(parts["valid"])) == [(0, 2), (0, 3), (1, 3)]
    assert sorted(pairs(parts["train"])) == sorted(set(pairs(table)) - set(
        pairs(parts["test"])) - set(pairs(parts["valid"])))  # user 2: too few, all in train
    with pytest.raises(DataError, match="test_fraction=0.8, valid_fraction=0.2"):
        split_interactions(table, test_fraction=0.8, valid_fraction=0.2, seed=0)


def test_split_interactions_without_timestamps_is_seeded() -> None:
    table = pa.table({"user": np.repeat(np.arange(50), 10), "item": np.tile(np.arange(10), 50)})
    a = split_interactions(table, test_fraction=0.3, valid_fraction=0.0, seed=1)
    b = split_interactions(table, test_fraction=0.3, valid_fraction=0.0, seed=1)
    c = split_interactions(table, test_fraction=0.3, valid_fraction=0.0, seed=2)
    assert set(a) == {"train", "test"}
    assert pairs(a["test"]) == pairs(b["test"]) != pairs(c["test"])
    users, counts = np.unique(a["test"]["user"].to_numpy(), return_counts=True)
    assert users.tolist() == list(range(50)) and set(counts) == {3}
    assert len({tuple(a["test"]["item"].to_numpy()[k * 3:k * 3 + 3]) for k in range(50)}) > 10


def test_ensure_prepared_loads_an_existing_data_set(clustered_source: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "ds"
    made = ensure_prepared(clustered_source, out, name="c", num_shards=2, seed=0)
    assert len(made.splits["train"].shards) == 2 and set(made.splits) == {"train", "test"}
    # The source is not read again: a missing one does not matter once prepared.
    assert ensure_prepared(tmp_path / "gone", out, name="c", num_shards=2, seed=0) == made
    with pytest.raises(DataError, match="gone: no such directory"):
        ensure_prepared(tmp_path / "gone", tmp_path / "other", name="c", num_shards=2, seed=0)


def test_cli_summary_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pq.write_table(pa.table({"uid": [1, 1, 2, 2, 9], "iid": [1, 2, 3, 4, 5]}),
                   tmp_path / "all.parquet")
    main(["--interactions", str(tmp_path / "all.parquet"), "--test-fraction", "0.5",
          "--user-col", "uid", "--item-col", "iid", "--out", str(tmp_path / "ds")])
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'ds'}: 3 users, 5 items; rows: train 3, test 2 (")
    assert Manifest.load(tmp_path / "ds").name == "ds"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.txt").write_text("0 1\n1 x\n")
    for argv, message in [
        (["--train", str(tmp_path / "nope.csv")], "nope.csv: no such file"),
        (["--source", str(tmp_path / "src")], "train.txt:2: item has 'x'"),
        (["--interactions", str(tmp_path / "all.parquet"), "--test-fraction", "0.5"],
         "missing column"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(tmp_path / "other")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    for argv in (["--train", "a.txt", "--source", "b"], ["--interactions", "a.txt"],
                 ["--source", "b", "--test", "t.txt"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(tmp_path / "other")])
        assert exit_info.value.code == 2
    assert not (tmp_path / "other").exists()


def test_cli_runs_as_a_module(clustered_source: Path, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dsl_dist.data.prepare", *args],
                              capture_output=True, text=True, timeout=60)

    ok = cli("--source", str(clustered_source), "--out", str(tmp_path / "ds"), "--name", "c")
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert "120 users, 60 items; rows: train 1,080, test 360" in ok.stdout
    again = cli("--source", str(clustered_source), "--out", str(tmp_path / "ds"))
    assert again.returncode == 2 and again.stderr.startswith("error: ") and \
        "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.skipif(not (SHARED_DATA / "lastfm").is_dir(), reason="shared data not present")
def test_real_lastfm(tmp_path: Path) -> None:
    source = SHARED_DATA / "lastfm"
    manifest = prepare_dataset(find_source_splits(source), tmp_path / "lastfm", name="lastfm")
    for split in ("train", "valid", "test"):
        # wc counts words and lines; each (non-empty) line is one user id followed by items
        words, lines = (int(subprocess.run(["wc", flag, str(source / f"{split}.txt")],
                                           capture_output=True, text=True, check=True)
                            .stdout.split()[0]) for flag in ("-w", "-l"))
        assert manifest.splits[split].rows == words - lines
    lines = [line.split() for split in ("train", "valid", "test")
             for line in (source / f"{split}.txt").read_text().splitlines()]
    raw = {"user": {int(ws[0]) for ws in lines}, "item": {int(w) for ws in lines for w in ws[1:]}}
    assert (manifest.num_users, manifest.num_items) == (len(raw["user"]), len(raw["item"]))
    for column, ids in raw.items():  # contiguous from 0, so the mapping is the identity
        assert ids == set(range(len(ids)))
        mapping = pq.read_table(tmp_path / "lastfm" / f"{column}_map.parquet")
        assert mapping["raw"].to_pylist() == mapping["index"].to_pylist() == sorted(ids)


def test_a_validation_split_is_carved_out_of_train(clustered_source: Path, tmp_path: Path) -> None:
    whole = prepare_dataset(find_source_splits(clustered_source), tmp_path / "whole", name="c")
    out = tmp_path / "carved"
    carved = ensure_prepared(clustered_source, out, name="c", num_shards=2, seed=0,
                             valid_fraction=0.25)
    assert set(carved.splits) == {"train", "valid", "test"}
    train, valid = pairs(read_split(out, "train")), pairs(read_split(out, "valid"))
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(pairs(read_split(tmp_path / "whole", "train")))
    assert pairs(read_split(out, "test")) == pairs(read_split(tmp_path / "whole", "test"))
    per_user = np.bincount(read_split(tmp_path / "whole", "train")["user"].to_numpy())
    held = np.bincount(read_split(out, "valid")["user"].to_numpy(), minlength=len(per_user))
    assert (held == np.floor(per_user * 0.25)).all() and held.sum() > 0
    assert carved.num_users == whole.num_users and carved.num_items == whole.num_items
    again = prepare_dataset(find_source_splits(clustered_source), tmp_path / "again", name="c",
                            valid_fraction=0.25)
    assert pairs(read_split(tmp_path / "again", "valid")) == valid  # deterministic by seed
    with pytest.raises(DataError, match="prepared without a validation split"):
        ensure_prepared(clustered_source, tmp_path / "whole", name="c", num_shards=2, seed=0,
                        valid_fraction=0.25)
    (clustered_source / "valid.txt").write_text((clustered_source / "test.txt").read_text())
    with pytest.raises(DataError, match="has a validation split already"):
        prepare_dataset(find_source_splits(clustered_source), tmp_path / "twice", name="c",
                        valid_fraction=0.25)
