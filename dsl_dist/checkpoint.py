"""Sharded checkpoints that resume exactly, written with torch.distributed.checkpoint (DCP).

A checkpoint is a directory `step-<step>` holding DCP's files, where every rank writes its own
shards of the embedding tables, the fused optimizer state, the dense optimizer and the sparsity
masks (all addressed by global offsets, so DCP reshards them for another world size), and
`trainer.json`: the step, the data stream's position, the controller's state, the config the
checkpoint belongs to, the length of metrics.jsonl and a SHA-256 of every file. It is written
as `.step-<step>.partial` and renamed when complete, so a crash mid-save leaves only complete
checkpoints under their final names. Nothing is unpickled: DCP reads its own format and
trainer.json is JSON. Every rank must see the checkpoint directory (a shared file system on
several machines).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp

from dsl_dist.config import ConfigError, JobConfig
from dsl_dist.distributed import DistContext

META = "trainer.json"
_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt (the message names the file)."""


def fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """The settings a checkpoint shares with any run that continues it: model, sparsity,
    optimisation and data order; not paths, launchers, evaluation or the world size."""
    sections = {"model": dataclasses.asdict(cfg.model),
                "sparsity": dataclasses.asdict(cfg.sparsity),
                "train": dataclasses.asdict(cfg.train),
                "data": {k: getattr(cfg.data, k) for k in ("name", "batch_size",
                                                           "num_negatives", "shuffle_buffer")}}
    return {f"{section}.{key}": value for section, values in sections.items()
            for key, value in values.items()}


def check_compatible(path: Path, saved: dict[str, Any], cfg: JobConfig) -> None:
    """Refuses a checkpoint made with other settings, naming every key that differs."""
    mine = fingerprint(cfg)
    differ = [f"{key}={saved.get(key)!r} (this run: {mine[key]!r})"
              for key in mine if saved.get(key) != mine[key]]
    if differ:
        raise ConfigError(f"checkpoint {path} was made with other settings: " + ", ".join(differ))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in `directory`, newest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob(f"{_PREFIX}*") if p.is_dir()), reverse=True)


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json, after checking every file against its SHA-256."""
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META}, not a complete checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is corrupt: {exc}") from None
    for name, digest in meta["files"].items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(path / name) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt)")
    return meta


class CheckpointStore:
    """The checkpoints of one run: save, find and load them (every method is collective)."""

    def __init__(self, directory: Path, keep: int, ctx: DistContext) -> None:
        self.directory, self.keep, self.ctx = directory, keep, ctx

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Writes `state` (each rank its shards) and rank 0's `meta`; returns the checkpoint."""
        final = self.directory / f"{_PREFIX}{step:09d}"
        partial = self.directory / f".{final.name}.partial"
        if self.ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.ctx.barrier()
        dcp.save(state, checkpoint_id=partial, process_group=self.ctx.group)
        self.ctx.barrier()
        if self.ctx.is_main:
            files = {f.name: _sha256(f) for f in sorted(partial.iterdir())}
            (partial / META).write_text(json.dumps({**meta, "files": files}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in complete_checkpoints(self.directory)[self.keep:]:
                shutil.rmtree(old)
        self.ctx.barrier()
        return final

    def verify(self, path: Path) -> dict[str, Any]:
        """The checkpoint's meta, its files checked by rank 0 (CheckpointError on every rank
        if one is missing or corrupt)."""
        return self.ctx.main_then_broadcast(lambda: read_meta(path))

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Fills `state` in place from the checkpoint (DCP, resharding as needed)."""
        dcp.load(state, checkpoint_id=path, process_group=self.ctx.group)

    @staticmethod
    def finished(path: Path) -> bool:
        """Whether the checkpoint is the last one of a run that ended."""
        try:
            return bool(json.loads((path / META).read_text()).get("finished"))
        except (OSError, json.JSONDecodeError):
            return False
