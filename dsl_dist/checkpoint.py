"""Sharded checkpoints that resume exactly, written with torch.distributed.checkpoint (DCP).

Whatever has state registers with the run's `CheckpointStore` under a name, as a `Stateful`
(`state_dict()` / `load_state_dict()`, as torchtitan's): sharded components (the model's tables,
the optimizers, the sparsity state) go to DCP, where every rank writes its own shards addressed
by global offsets, so DCP reshards them for another world size; small ones (the config the
checkpoint belongs to, the training progress, the data stream's position, the controller, the
run log's length) go to `trainer.json` as rank 0's JSON, next to the step and a SHA-256 of
every file. Save and resume are one loop over the registry, in registration order, so a new
component is one `register` call.

A checkpoint is a directory `step-<step>`, written as `.step-<step>.partial` and renamed when
complete, so a crash mid-save leaves only complete checkpoints under their final names. Nothing
is unpickled: DCP reads its own format and trainer.json is JSON. Every rank must see the
checkpoint directory (a shared file system on several machines).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Protocol

import torch.distributed.checkpoint as dcp

from dsl_dist.config import ConfigError, JobConfig
from dsl_dist.distributed import DistContext

META = "trainer.json"
_PREFIX = "step-"
_RESERVED = ("step", "finished", "world_size", "files")
"""trainer.json's own keys, which no component may be registered as."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt (the message names the file)."""


WATCHING = ("log_every", "progress", "progress_every_s", "tensorboard", "pipeline")
"""Settings of `train` that only change how a run is watched or how its steps are scheduled
(not what they compute), which a resume may change."""


def fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """The settings a checkpoint shares with any run that continues it: model, sparsity,
    optimisation and data order; not paths, launchers, evaluation, watching or the world
    size."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in WATCHING}
    sections = {"model": dataclasses.asdict(cfg.model),
                "sparsity": dataclasses.asdict(cfg.sparsity),
                "train": train,
                "data": {k: getattr(cfg.data, k) for k in ("name", "batch_size",
                                                           "num_negatives", "shuffle_buffer")}}
    return {f"{section}.{key}": value for section, values in sections.items()
            for key, value in values.items()}


class Stateful(Protocol):
    """What the store saves and restores. Sharded components return tensors (ShardedTensors
    of this rank's shards, or whole tensors) that DCP fills in place on load, before
    `load_state_dict` receives them; the others return JSON-able values, of which rank 0's
    are kept. `state_dict` is called on every rank (it may be collective)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ConfigFingerprint:
    """The settings a checkpoint belongs to; loading refuses a checkpoint of other settings,
    naming every key that differs (registered first, so before any tensor is read)."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg

    def state_dict(self) -> dict[str, Any]:
        return fingerprint(self.cfg)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = fingerprint(self.cfg)
        differ = [f"{key}={state.get(key)!r} (this run: {mine[key]!r})"
                  for key in mine if state.get(key) != mine[key]]
        if differ:
            raise ConfigError("made with other settings: " + ", ".join(differ))


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
    """The checkpoints of one run and the components they hold: register, save, find and
    load (every method but `register` is collective)."""

    def __init__(self, directory: Path, keep: int, ctx: DistContext) -> None:
        self.directory, self.keep, self.ctx = directory, keep, ctx
        self._components: dict[str, tuple[Stateful, bool]] = {}

    def register(self, name: str, component: Stateful, *, sharded: bool) -> None:
        """Adds `component` to every checkpoint under `name`: to DCP if `sharded`, else to
        trainer.json. Components load in the order they were registered."""
        if name in self._components or name in _RESERVED:
            raise ValueError(f"checkpoint component {name!r} is taken")
        self._components[name] = (component, sharded)

    def save(self, step: int, finished: bool = False, *, into: Optional[Path] = None,
             keep: Optional[int] = None) -> Path:
        """Writes every component (each rank its shards, rank 0 the JSON) into the store's
        directory (or `into`, keeping `keep` there); returns the checkpoint."""
        directory = self.directory if into is None else into
        keep = self.keep if keep is None else keep
        tensors = {name: c.state_dict() for name, (c, sharded) in self._components.items()
                   if sharded}
        small = {name: c.state_dict() for name, (c, sharded) in self._components.items()
                 if not sharded}
        final = directory / f"{_PREFIX}{step:09d}"
        partial = directory / f".{final.name}.partial"
        if self.ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.ctx.barrier()
        dcp.save(tensors, checkpoint_id=partial, process_group=self.ctx.group)
        self.ctx.barrier()
        if self.ctx.is_main:
            files = {f.name: _sha256(f) for f in sorted(partial.iterdir())}
            meta = {"step": step, "finished": finished, "world_size": self.ctx.world_size,
                    **small, "files": files}
            (partial / META).write_text(json.dumps(meta))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in complete_checkpoints(directory)[keep:]:
                shutil.rmtree(old)
        self.ctx.barrier()
        return final

    def verify(self, path: Path) -> dict[str, Any]:
        """The checkpoint's meta, its files checked by rank 0 (CheckpointError on every rank
        if one is missing or corrupt)."""
        return self.ctx.main_then_broadcast(lambda: read_meta(path))

    def resume(self, candidates: list[Path],
               warn: Optional[Any] = None) -> tuple[Path, dict[str, Any]]:
        """Loads every component from the first loadable checkpoint of `candidates` (newest
        first); a corrupt or partial one is reported to `warn` and the next tried. Returns
        the checkpoint and its meta."""
        for index, path in enumerate(candidates):
            try:
                meta = self.verify(path)
            except CheckpointError as exc:
                if index + 1 == len(candidates) or warn is None:
                    raise
                warn(f"warning: {exc}; trying {candidates[index + 1]}")
                continue
            self.load(path, meta)
            return path, meta
        raise CheckpointError("no checkpoint to resume from")

    def load(self, path: Path, meta: dict[str, Any]) -> None:
        """Restores every component from the checkpoint at `path` (whose verified meta is
        `meta`), in registration order; DCP reshards as needed."""
        for name, (component, sharded) in self._components.items():
            if not sharded:
                try:
                    component.load_state_dict(meta[name])
                except ConfigError as exc:
                    raise ConfigError(f"checkpoint {path}: {exc}") from None
                continue
            state = {name: component.state_dict()}
            dcp.load(state, checkpoint_id=path, process_group=self.ctx.group)
            component.load_state_dict(state[name])

    @staticmethod
    def finished(path: Path) -> bool:
        """Whether the checkpoint is the last one of a run that ended."""
        try:
            return bool(json.loads((path / META).read_text()).get("finished"))
        except (OSError, json.JSONDecodeError):
            return False


class OptimizerState:
    """An unfused optimizer as a checkpoint component. Adam's state appears at its first step,
    so a resume, which asks for the state before any step, creates it to load into."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if not self.optimizer.state:
            self.optimizer.init_state()
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
