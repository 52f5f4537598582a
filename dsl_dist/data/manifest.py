"""manifest.json: what a prepared data set holds, with a checksum per shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dsl_dist.data.errors import DataError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    path: str
    """Relative to the data set directory."""
    rows: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    rows: int
    shards: list[ShardInfo]


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    name: str
    num_users: int
    num_items: int
    seed: int
    splits: dict[str, SplitInfo]

    def save(self, dataset_dir: Path) -> None:
        (Path(dataset_dir) / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, dataset_dir: Path) -> "Manifest":
        path = Path(dataset_dir) / MANIFEST
        if not path.is_file():
            raise DataError(f"{path}: no manifest; prepare the data set first with "
                            f"`python -m dsl_dist.data.prepare --source DIR --out {dataset_dir}`")
        try:
            raw = json.loads(path.read_text())
            if raw.get("schema_version") != SCHEMA_VERSION:
                raise DataError(f"{path}: schema_version {raw.get('schema_version')!r} is not "
                                f"{SCHEMA_VERSION}; prepare the data set again")
            splits = {name: SplitInfo(split["rows"], [ShardInfo(**s) for s in split["shards"]])
                      for name, split in raw.pop("splits").items()}
            manifest = cls(splits=splits, **raw)
        except (AttributeError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: malformed manifest ({exc})") from None
        for split in manifest.splits.values():
            for shard in split.shards:
                if not (Path(dataset_dir) / shard.path).is_file():
                    raise DataError(f"{Path(dataset_dir) / shard.path}: shard listed in {path} "
                                    "is missing")
        return manifest

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"data set {self.name!r} has no {name!r} split "
                            f"(it has {sorted(self.splits)})")
        return self.splits[name]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shard(dataset_dir: Path, shard: ShardInfo) -> None:
    """Raises DataError when a shard's bytes differ from the manifest's checksum."""
    path = Path(dataset_dir) / shard.path
    if file_sha256(path) != shard.sha256:
        raise DataError(f"{path}: corrupt shard (sha256 differs from the manifest)")
