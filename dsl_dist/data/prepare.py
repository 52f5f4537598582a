"""Turns interaction files into a prepared data set: contiguous ids, Parquet shards, manifest.

    python -m dsl_dist.data.prepare --source ../shared/data/lastfm --out data/lastfm
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dsl_dist.data.errors import DataError
from dsl_dist.data.formats import FORMATS, read_interactions
from dsl_dist.data.manifest import SCHEMA_VERSION, Manifest, ShardInfo, SplitInfo, file_sha256

SPLITS = ("train", "valid", "test")


def find_source_splits(source_dir: Path) -> dict[str, Path]:
    """The train/valid/test files (any supported format) of a source directory."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise DataError(f"{source_dir}: no such directory")
    found = {}
    for split in SPLITS:
        files = [source_dir / f"{split}{ext}" for ext in FORMATS
                 if (source_dir / f"{split}{ext}").is_file()]
        if len(files) > 1:
            raise DataError(f"{source_dir}: more than one {split} file: {[f.name for f in files]}")
        if files:
            found[split] = files[0]
    if "train" not in found:
        raise DataError(f"{source_dir}: no train file (train.txt, train.csv or train.parquet)")
    return found


def split_interactions(table: pa.Table, *, test_fraction: float, valid_fraction: float = 0.0,
                       seed: int = 0) -> dict[str, pa.Table]:
    """Holds out a fraction of each user's interactions, for data that comes as one file: the
    latest ones when the table has timestamps, random ones (by seed) otherwise. Counts round
    down, so a user with too few interactions keeps them all in train."""
    if not (0 < test_fraction and 0 <= valid_fraction and test_fraction + valid_fraction < 1):
        raise DataError(f"test_fraction={test_fraction}, valid_fraction={valid_fraction}: "
                        "need 0 < test, 0 <= valid and test + valid < 1")
    users = table["user"].to_numpy()
    order_key = (table["timestamp"].to_numpy() if "timestamp" in table.column_names
                 else np.random.default_rng(seed).random(len(users)))
    order = np.lexsort((order_key, users))
    sorted_users = users[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    user_rows = np.repeat(counts, counts)  # per row: how many rows its user has
    from_end = user_rows - (np.arange(len(users)) - np.repeat(starts, counts))  # last row: 1
    n_test = np.floor(user_rows * test_fraction)
    n_valid = np.floor(user_rows * valid_fraction)
    which = np.where(from_end <= n_test, 2, np.where(from_end <= n_test + n_valid, 1, 0))
    parts = {"train": 0, "valid": 1, "test": 2}
    out = {name: table.take(pa.array(order[which == code])) for name, code in parts.items()}
    return {name: t for name, t in out.items() if t.num_rows or name == "train"}


def carve_validation(tables: dict[str, pa.Table], valid_fraction: float,
                     seed: int = 0) -> dict[str, pa.Table]:
    """Moves `valid_fraction` of each user's train interactions (the latest ones, or random
    ones by seed) into a validation split, for data sets that come without one (gowalla): the
    split that hyperparameters and epochs are chosen on, so that test stays unseen."""
    if valid_fraction == 0:
        return tables
    if "valid" in tables:
        raise DataError(f"valid_fraction={valid_fraction}: the source has a validation split "
                        "already; carve one only from data that has none")
    if not 0 < valid_fraction < 1:
        raise DataError(f"valid_fraction={valid_fraction}: need 0 <= valid_fraction < 1")
    held_out = split_interactions(tables["train"], test_fraction=valid_fraction, seed=seed)
    return {**tables, "train": held_out["train"], "valid": held_out.get("test",
                                                                        held_out["train"][:0])}


def _id_map(tables: Sequence[pa.Table], column: str) -> np.ndarray:
    return np.unique(np.concatenate([t[column].to_numpy() for t in tables]))


def _write_split(table: pa.Table, directory: Path, name: str, num_shards: int,
                 rows_per_group: int) -> SplitInfo:
    (directory / name).mkdir()
    bounds = np.linspace(0, table.num_rows, min(num_shards, table.num_rows) + 1).astype(int)
    shards = []
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        relative = f"{name}/part-{index:05d}.parquet"
        pq.write_table(table.slice(start, stop - start), directory / relative,
                       row_group_size=rows_per_group)
        shards.append(ShardInfo(relative, int(stop - start), file_sha256(directory / relative)))
    return SplitInfo(table.num_rows, shards)


def prepare_dataset(splits: dict[str, Path], out_dir: Path, *, name: str, num_shards: int = 4,
                    rows_per_group: int = 65536, seed: int = 0, overwrite: bool = False,
                    user_col: str = "user", item_col: str = "item",
                    valid_fraction: float = 0.0) -> Manifest:
    """Reads `splits` (name → file), remaps ids and writes the data set to `out_dir`, with a
    validation split carved out of train if `valid_fraction` > 0."""
    _check_target(Path(out_dir), overwrite)  # before reading inputs that may take a while
    tables = {s: read_interactions(p, user_col, item_col) for s, p in splits.items()}
    return write_dataset(carve_validation(tables, valid_fraction, seed), out_dir, name=name, num_shards=num_shards,
                         rows_per_group=rows_per_group, seed=seed, overwrite=overwrite)


def write_dataset(tables: dict[str, pa.Table], out_dir: Path, *, name: str, num_shards: int = 4,
                  rows_per_group: int = 65536, seed: int = 0,
                  overwrite: bool = False) -> Manifest:
    """Writes tables as read by `read_interactions` (name → table) as a data set: remaps ids
    to contiguous ranges (sorted raw order, so contiguous ids stay as they are), shuffles train
    rows so that any contiguous range is a uniform sample, sorts the eval splits by (user,
    item), and moves everything into place only once it is complete."""
    out_dir = Path(out_dir)
    if "train" not in tables or not set(tables) <= set(SPLITS):
        raise DataError(f"splits {sorted(tables)}: need 'train', and only names from {SPLITS}")
    if num_shards < 1 or rows_per_group < 1:
        raise DataError(f"num_shards={num_shards}, rows_per_group={rows_per_group}: must be >= 1")
    _check_target(out_dir, overwrite)
    ids = {column: _id_map(list(tables.values()), column) for column in ("user", "item")}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so that the final rename stays on one file system; mkdir (unlike mkdtemp)
    # gives it the usual permissions, which the data set keeps.
    staging = out_dir.with_name(f".{out_dir.name}-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        split_infos = {}
        for split, table in tables.items():
            for column, raw in ids.items():
                index = np.searchsorted(raw, table[column].to_numpy())
                table = table.set_column(table.schema.get_field_index(column), column,
                                         pa.array(index))
            if split == "train":
                order = np.random.default_rng(seed).permutation(table.num_rows)
                table = table.take(pa.array(order))
            else:
                table = table.sort_by([("user", "ascending"), ("item", "ascending")])
            split_infos[split] = _write_split(table, staging, split, num_shards, rows_per_group)
        for column, raw in ids.items():
            pq.write_table(pa.table({"raw": raw, "index": np.arange(len(raw))}),
                           staging / f"{column}_map.parquet")
        manifest = Manifest(SCHEMA_VERSION, name, len(ids["user"]), len(ids["item"]), seed,
                            split_infos)
        manifest.save(staging)
        move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir}: already exists and is not empty; pass --overwrite to "
                        "replace it")


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Renames the complete `staging` to `out_dir`; an existing `out_dir` is put aside first
    and deleted only once the new one is in place, so that a failure keeps the old one."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = staging.with_name(f"{staging.name}-old")
    out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except OSError:
        old.rename(out_dir)
        raise
    shutil.rmtree(old)


def ensure_prepared(source: Path, out_dir: Path, *, name: str, num_shards: int,
                    seed: int, valid_fraction: float = 0.0) -> Manifest:
    """The manifest of `out_dir`, preparing it from the split files in `source` if needed."""
    if (Path(out_dir) / "manifest.json").exists():
        manifest = Manifest.load(out_dir)
        if valid_fraction and "valid" not in manifest.splits:
            raise DataError(f"{out_dir}: prepared without a validation split, but "
                            f"valid_fraction={valid_fraction} asks for one; prepare into "
                            "another path")
        return manifest
    return prepare_dataset(find_source_splits(source), out_dir, name=name,
                           num_shards=num_shards, seed=seed, valid_fraction=valid_fraction)


def main(argv: Optional[list[str]] = None) -> None:
    """The CLI; bad input data ends it with `error: ...` on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m dsl_dist.data.prepare",
                                     description=__doc__.splitlines()[0])
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--source", type=Path, help="directory with train/valid/test files")
    inputs.add_argument("--train", type=Path, help="train file (with --valid/--test)")
    inputs.add_argument("--interactions", type=Path,
                        help="one file, held out per user (with --test-fraction)")
    parser.add_argument("--valid", type=Path)
    parser.add_argument("--test", type=Path)
    parser.add_argument("--test-fraction", type=float)
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="hold out this fraction of each user's interactions for "
                             "validation: from --interactions, or from train when the source "
                             "has no validation file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", help="data set name (default: the --out directory name)")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--rows-per-group", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--user-col", default="user")
    parser.add_argument("--item-col", default="item")
    args = parser.parse_args(argv)
    if (args.valid or args.test) and not args.train:
        parser.error("--valid and --test go with --train")
    if (args.test_fraction is not None) != bool(args.interactions):
        parser.error("--interactions needs --test-fraction, which only goes with it")
    options = dict(name=args.name or args.out.name, num_shards=args.num_shards,
                   rows_per_group=args.rows_per_group, seed=args.seed, overwrite=args.overwrite)
    started = time.perf_counter()
    try:
        if args.interactions:
            table = read_interactions(args.interactions, args.user_col, args.item_col)
            manifest = write_dataset(split_interactions(
                table, test_fraction=args.test_fraction, valid_fraction=args.valid_fraction,
                seed=args.seed), args.out, **options)
        else:
            files = (find_source_splits(args.source) if args.source else
                     {s: p for s, p in (("train", args.train), ("valid", args.valid),
                                        ("test", args.test)) if p is not None})
            manifest = prepare_dataset(files, args.out, user_col=args.user_col,
                                       item_col=args.item_col,
                                       valid_fraction=args.valid_fraction, **options)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    rows = ", ".join(f"{s} {info.rows:,}" for s, info in manifest.splits.items())
    print(f"{args.out}: {manifest.num_users:,} users, {manifest.num_items:,} items; rows: {rows} "
          f"({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
