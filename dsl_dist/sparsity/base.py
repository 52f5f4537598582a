"""The seam between the training loop and a sparse-training method.

The loop calls the same hooks on every method around every step; a method keeps its own state,
runs its own updates and registers with the checkpoint store what a checkpoint must keep.
Dense training is the method whose hooks do nothing; the sparse methods are drop-and-grow
(engine.py). `sparsity=<name>` picks the method from `dsl_dist/config/registry.py`.

Methods never talk to the controller's transport: the job's controller (budget, schedule,
plan, history; `dsl_dist/control`) is built outside, by `SparsitySetup.connect`, and reaches
a method as the `Controller` protocol below; every cross-rank count a method needs goes
through its `DistContext`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.optim.keyed import KeyedOptimizer

from dsl_dist.config import JobConfig, SparsityConfig
from dsl_dist.distributed import DistContext
from dsl_dist.model.sharding import embedding_tables, shard_model
from dsl_dist.model.shards import init_normal_, local_table_shards
from dsl_dist.sparsity.record import UpdateRecord
from dsl_dist.sparsity.schedule import UpdateSchedule

if TYPE_CHECKING:
    from dsl_dist.checkpoint import CheckpointStore


class Controller(Protocol):
    """The job's control plane as a method sees it (every method is called by every rank in
    the same order, except `record`, called by rank 0 with the update's outcome)."""

    schedule: UpdateSchedule

    def plan(self, step: int) -> list[int]:
        """How many weights each budget group moves at update step `step`."""
        ...

    def record(self, update: UpdateRecord) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ConnectController = Callable[[list[int], int], Controller]
"""Builds the job's controller (once per run) for the budget of every group, counted in units
of the given number of weights (1 for single weights, b for blocks of b)."""


@dataclass
class SparsitySetup:
    """What a method is built from: its config section, the run's seed and the tables' initial
    std, the sharded model with its table configs (as declared before sharding), this rank's
    context, the run's length, the unfused optimizer of the dense parameters and
    data-parallel tables (None if there are none) and the controller's builder."""

    cfg: SparsityConfig
    seed: int
    init_std: float
    model: nn.Module
    tables: list[BaseEmbeddingConfig]
    ctx: DistContext
    total_steps: int
    dense_optimizer: Optional[KeyedOptimizer]
    connect: ConnectController


class SparsityMethod:
    """The training loop's hooks; as they are here, dense training (every hook does nothing)."""

    def before_step(self, step: int) -> None:
        """Called before training step `step` (counted from 1)."""

    def after_backward(self) -> None:
        """Called after the backward pass (the fused tables are already updated)."""

    def after_optimizer_step(self, step: int) -> Optional[UpdateRecord]:
        """Called after step `step`'s optimizer updates; returns the record of the update it
        ran at this step (written to metrics.jsonl), if any."""
        return None

    def memory_bytes(self) -> int:
        """Bytes of this rank's sparsity state (masks, statistics, layouts)."""
        return 0

    def register_state(self, store: CheckpointStore) -> None:
        """Registers with `store` what checkpoints must keep of this method (nothing here)."""


def sharded_for_method(method: ModuleType, cfg: JobConfig, module: nn.Module, ctx: DistContext
                       ) -> tuple[nn.Module, nn.Module, list[BaseEmbeddingConfig]]:
    """The plain model (on the meta device) as sparsity method `method` stores it (its module's
    optional `transform_model`), sharded and initialised as every run is: (that module, the
    sharded model, its table configs as declared before sharding)."""
    if hasattr(method, "transform_model"):
        module = method.transform_model(cfg.sparsity, module)
    tables = embedding_tables(module)
    torch.manual_seed(cfg.train.seed)  # dense layers (DDP then copies rank 0's everywhere)
    model = shard_model(module, cfg.model, cfg.train, ctx)
    init_normal_(local_table_shards(model), cfg.model.init_std, cfg.train.seed)
    return module, model, tables
