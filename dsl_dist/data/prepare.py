"""Turns interaction files into a prepared data set: contiguous ids, Parquet shards, manifest.

    python -m dsl_dist.data.prepare --source ../shared/data/lastfm --out data/lastfm
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
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
    found = {split: source_dir / f"{split}{ext}" for split in SPLITS for ext in FORMATS
             if (source_dir / f"{split}{ext}").is_file()}
    if "train" not in found:
        raise DataError(f"{source_dir}: no train file (train.txt, train.csv or train.parquet)")
    return found


def split_interactions(table: pa.Table, *, test_fraction: float, valid_fraction: float = 0.0,
                       seed: int = 0) -> dict[str, pa.Table]:
    """Holds out a fraction of each user's interactions: the latest ones when the table has
    timestamps, random ones (by seed) otherwise."""
    if not (0 < test_fraction < 1 and 0 <= valid_fraction < 1 and test_fraction + valid_fraction < 1):
        raise DataError(f"test_fraction={test_fraction}, valid_fraction={valid_fraction}: "
                        "need 0 < test, 0 <= valid and test + valid < 1")
    users = table["user"].to_numpy()
    order_key = (table["timestamp"].to_numpy() if "timestamp" in table.column_names
                 else np.random.default_rng(seed).random(len(users)))
    order = np.lexsort((order_key, users))
    sorted_users = users[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    position = np.arange(len(users)) - np.repeat(starts, counts)
    from_end = np.repeat(counts, counts) - position  # 1 for each user's last row
    n_test = np.floor(np.repeat(counts, counts) * test_fraction)
    n_valid = np.floor(np.repeat(counts, counts) * valid_fraction)
    which = np.where(from_end <= n_test, 2, np.where(from_end <= n_test + n_valid, 1, 0))
    parts = {"train": 0, "valid": 1, "test": 2}
    out = {name: table.take(pa.array(order[which == code])) for name, code in parts.items()}
    return {name: t for name, t in out.items() if t.num_rows or name == "train"}


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
                    user_col: str = "user", item_col: str = "item") -> Manifest:
    """Reads `splits` (name → file), remaps ids and writes the data set to `out_dir`."""
    return write_dataset({s: read_interactions(p, user_col, item_col) for s, p in splits.items()},
                         out_dir, name=name, num_shards=num_shards,
                         rows_per_group=rows_per_group, seed=seed, overwrite=overwrite)


def write_dataset(tables: dict[str, pa.Table], out_dir: Path, *, name: str, num_shards: int = 4,
                  rows_per_group: int = 65536, seed: int = 0,
                  overwrite: bool = False) -> Manifest:
    """Remaps ids to contiguous ranges (sorted raw order, so contiguous ids stay as they are),
    shuffles train rows so that any contiguous range is a uniform sample, sorts the eval
    splits by (user, item), and writes everything into place only once it is complete."""
    out_dir = Path(out_dir)
    if "train" not in tables:
        raise DataError("a data set needs a train split")
    if num_shards < 1 or rows_per_group < 1:
        raise DataError(f"num_shards={num_shards}, rows_per_group={rows_per_group}: must be >= 1")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir}: already exists and is not empty; pass --overwrite to "
                        "replace it")
    user_ids = _id_map(list(tables.values()), "user")
    item_ids = _id_map(list(tables.values()), "item")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        split_infos = {}
        for split, table in tables.items():
            table = table.set_column(0, "user", pa.array(np.searchsorted(user_ids, table["user"])))
            table = table.set_column(1, "item", pa.array(np.searchsorted(item_ids, table["item"])))
            if split == "train":
                table = table.take(pa.array(np.random.default_rng(seed).permutation(table.num_rows)))
            else:
                table = table.sort_by([("user", "ascending"), ("item", "ascending")])
            split_infos[split] = _write_split(table, staging, split, num_shards, rows_per_group)
        for column, ids in (("user", user_ids), ("item", item_ids)):
            pq.write_table(pa.table({"raw": ids, "index": np.arange(len(ids))}),
                           staging / f"{column}_map.parquet")
        manifest = Manifest(SCHEMA_VERSION, name, len(user_ids), len(item_ids), seed, split_infos)
        manifest.save(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def ensure_prepared(source: Path, out_dir: Path, *, name: str, num_shards: int,
                    seed: int) -> Manifest:
    """The manifest of `out_dir`, preparing it from the split files in `source` if needed."""
    if (Path(out_dir) / "manifest.json").exists():
        return Manifest.load(out_dir)
    return prepare_dataset(find_source_splits(source), out_dir, name=name,
                           num_shards=num_shards, seed=seed)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsl_dist.data.prepare",
                                     description=__doc__.splitlines()[0])
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--source", type=Path, help="directory with train/valid/test files")
    inputs.add_argument("--train", type=Path, help="train file (with --valid/--test)")
    inputs.add_argument("--interactions", type=Path, help="one file, split per user")
    parser.add_argument("--valid", type=Path)
    parser.add_argument("--test", type=Path)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--valid-fraction", type=float, default=0.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--rows-per-group", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--user-col", default="user")
    parser.add_argument("--item-col", default="item")
    args = parser.parse_args(argv)
    options = dict(name=args.name or args.out.name, num_shards=args.num_shards,
                   rows_per_group=args.rows_per_group, seed=args.seed, overwrite=args.overwrite)
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
                                       item_col=args.item_col, **options)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    rows = ", ".join(f"{s} {info.rows:,}" for s, info in manifest.splits.items())
    print(f"{args.out}: {manifest.num_users:,} users, {manifest.num_items:,} items; rows: {rows}")


if __name__ == "__main__":
    main()
