"""One drop-and-grow on a synthetic catalogue table, built without data or a training loop.

The update's cost is a function of the table's size, not of what trained it, so a table of
10^8 weights needs no data set of that size: this builds one item table of `weights` weights in
this process (a group of one; NCCL and the GPU when CUDA is available), sharded, initialised
and sparsified as training does, fills the growth statistic with random values (a trained
table's are distinct, unlike a fresh table's zeros, which would make every choice a tie) and
times one update.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from dsl_dist.config import ControlConfig, ModelConfig, SparsityConfig, TrainConfig
from dsl_dist.control import connect_controller
from dsl_dist.distributed import DistContext, init_distributed, shutdown_distributed
from dsl_dist.memory import PeakTracker, high_water_marks
from dsl_dist.model.sharding import embedding_tables, shard_model
from dsl_dist.model.shards import init_normal_, local_table_shards
from dsl_dist.registry import SPARSITY_METHODS, load
from dsl_dist.sparsity.base import SparsityMethod, SparsitySetup
from dsl_dist.sparsity.schedule import UpdateSchedule

SEED = 0
INIT_STD = 0.01
OPTIMIZER = {"cuda": "adam", "cpu": "rowwise_adagrad"}
"""The tables' fused optimizer: Adam where FBGEMM has it (its two states per weight are the
most an update resets), row-wise Adagrad on CPU."""


class Catalogue(nn.Module):
    """A plain model of one item table, (rows, dim), on the meta device until sharded."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.tables = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="item", embedding_dim=dim, num_embeddings=rows, feature_names=["item"])],
            device=torch.device("meta"))


def _randomise_growth(sparsity: SparsityMethod) -> None:
    """Distinct growth statistics, as training leaves them (the method's own tensors: dsl's
    per weight, block_dsl's per row), drawn where they live."""
    for shard in sparsity.shards:
        for name in ("growth", "grow_next", "grow_last"):
            if hasattr(shard, name):
                stat = getattr(shard, name)
                generator = torch.Generator(device=stat.device).manual_seed(SEED)
                stat.copy_(torch.rand(stat.shape, generator=generator, device=stat.device))


def build(method: str, ctx: DistContext, rows: int, dim: int, density: float
          ) -> SparsityMethod:
    """The sparsity method of a sharded catalogue, set up as the Trainer sets it up."""
    cfg = SparsityConfig(name=method, density=density, delta_t=1)
    module: nn.Module = Catalogue(rows, dim)
    sparse = load(SPARSITY_METHODS, method)
    if hasattr(sparse, "transform_model"):
        module = sparse.transform_model(cfg, module)
    tables = embedding_tables(module)
    train = TrainConfig(optimizer=OPTIMIZER[ctx.device.type])
    model = shard_model(module, ModelConfig(embedding_dim=dim), train, ctx)
    init_normal_(local_table_shards(model), INIT_STD, SEED)
    schedule = UpdateSchedule.of(cfg, total_steps=2)
    return sparse.build(SparsitySetup(
        cfg, SEED, INIT_STD, model, tables, ctx, 2, None,
        connect=lambda budgets, unit: connect_controller(ControlConfig(controller="collective"),
                                                         ctx, schedule, budgets, unit)))


def update_once(method: str, weights: int, dim: int, density: float) -> dict[str, Any]:
    """Builds the catalogue (ceil(weights / dim) rows), runs one update and returns its
    record's figures with the update's peak memory (CUDA allocated memory on a GPU, RSS on
    CPU)."""
    ctx = init_distributed("auto")
    try:
        rows = math.ceil(weights / dim)
        sparsity = build(method, ctx, rows, dim, density)
        _randomise_growth(sparsity)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        peaks = PeakTracker(high_water_marks(ctx.device))
        peaks.start()
        record = sparsity.update(1)
        memory = peaks.stop()
        return {"method": method, "weights": rows * dim, "rows": rows, "dim": dim,
                "density": density, "device": str(ctx.device), "backend": ctx.backend,
                "optimizer": OPTIMIZER[ctx.device.type], "seconds": record["seconds"],
                "active": record["active"], "budget": record["budget"],
                "moved": record["grown"], **memory}
    finally:
        shutdown_distributed()
