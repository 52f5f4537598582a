"""One drop-and-grow on a synthetic catalogue table, built without data or a training loop.

The update's cost is a function of the table's size, not of what trained it, so a table of
10^8 weights needs no data set of that size: this builds one item table of `weights` weights in
this process (a group of one; NCCL and the GPU when CUDA is available), sharded, initialised
and sparsified as training does, fills the growth statistic with random values (a trained
table's are distinct, unlike a fresh table's zeros, which would make every choice a tie) on a
fraction of the rows (`touched`: the rest stay 0, as the rows no step looked up) and times one
update.

    python benchmarks/synthetic_table.py [--weights 1e8] [--touched 1.0 0.03]
                                         [--methods dsl block_dsl]

writes benchmarks/results/update_synthetic.json (one process per update, world size 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from dsl_dist.config import (ControlConfig, DropAndGrowConfig, JobConfig, ModelConfig,
                             TrainConfig, sparsity_config)
from dsl_dist.config.registry import SPARSITY_METHODS, load
from dsl_dist.control import connect_controller
from dsl_dist.distributed import DistContext, init_distributed, shutdown_distributed
from dsl_dist.memory import PeakTracker, high_water_marks, release_freed_memory, rss_mb
from dsl_dist.sparsity.base import SparsityMethod, SparsitySetup, sharded_for_method
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


def randomise_growth(sparsity: SparsityMethod, touched: float = 1.0) -> None:
    """Distinct growth statistics, as training leaves them (the method's own tensors: dsl's
    per weight, block_dsl's per row), drawn where they live, on a `touched` fraction of the
    rows and zero elsewhere (rows no step looked up in the window: in training most of them,
    and then the grow threshold is 0 and most candidates tie there)."""
    for shard in sparsity.shards:
        for name in ("growth", "grow_next", "grow_last"):
            if hasattr(shard, name):
                stat = getattr(shard, name)
                generator = torch.Generator(device=stat.device).manual_seed(SEED)
                stat.copy_(torch.rand(stat.shape, generator=generator, device=stat.device))
                if touched < 1:
                    untouched = torch.rand(stat.shape[0], generator=generator,
                                           device=stat.device) >= touched
                    stat[untouched] = 0


def build(method: str, ctx: DistContext, rows: int, dim: int, density: float,
          **settings: Any) -> tuple[nn.Module, SparsityMethod]:
    """A sharded catalogue and its sparsity method, set up as the Trainer sets them up;
    `settings`: more fields of the method's config (dense's has none)."""
    budgeted = issubclass(SPARSITY_METHODS[method].schema, DropAndGrowConfig)
    cfg = sparsity_config(method, **({"density": density, "delta_t": 1, **settings}
                                     if budgeted else {}))
    job = JobConfig(model=ModelConfig(embedding_dim=dim, init_std=INIT_STD), sparsity=cfg,
                    train=TrainConfig(optimizer=OPTIMIZER[ctx.device.type], seed=SEED))
    sparse = load(SPARSITY_METHODS, method)
    _, model, tables = sharded_for_method(sparse, job, Catalogue(rows, dim), ctx)
    return model, sparse.build(SparsitySetup(
        cfg, SEED, INIT_STD, model, tables, ctx, 2, None,
        connect=lambda budgets, unit: connect_controller(
            ControlConfig(controller="collective"), ctx, UpdateSchedule.of(cfg, total_steps=2),
            budgets, unit)))


def update_once(method: str, weights: int, dim: int, density: float, touched: float = 1.0
                ) -> dict[str, Any]:
    """Builds the catalogue (ceil(weights / dim) rows), runs one update (growth statistics
    on a `touched` fraction of the rows) and returns its record's figures with the update's
    peak memory (CUDA allocated memory on a GPU, RSS on CPU)."""
    ctx = init_distributed("auto")
    try:
        rows = math.ceil(weights / dim)
        _, sparsity = build(method, ctx, rows, dim, density)
        randomise_growth(sparsity, touched)
        release_freed_memory()  # as the trainer does after the initial masks
        before = rss_mb()
        allocated = None  # on CUDA: what the update's extra memory is counted over
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
            allocated = torch.cuda.memory_allocated(ctx.device) / 2**20
        peaks = PeakTracker(high_water_marks(ctx.device))
        peaks.start()
        record = sparsity.update(1)
        memory = peaks.stop()
        return {"method": method, "weights": rows * dim, "rows": rows, "dim": dim,
                "density": density, "touched_rows": touched, "device": str(ctx.device),
                "backend": ctx.backend,
                "optimizer": OPTIMIZER[ctx.device.type], "seconds": record.seconds,
                "active": record.active, "budget": record.budget,
                "moved": record.grown, "rss_mb_before": before,
                "allocated_mb_before": allocated, **memory}
    finally:
        shutdown_distributed()


def main() -> None:
    """One update per (method, touched fraction), each in a process of its own (a group of
    one), written to benchmarks/results/update_synthetic.json as {"rows": [...]}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, default=1e8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--methods", nargs="+", default=["dsl", "block_dsl"])
    parser.add_argument("--touched", nargs="+", type=float, default=[1.0, 0.03])
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "TOUCHED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child process: one update, its figures on stdout
        print(json.dumps(update_once(args.one[0], int(args.weights), args.dim, args.density,
                                     float(args.one[1]))))
        return
    rows = []
    for method in args.methods:
        for touched in args.touched:
            env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29631"}
            out = subprocess.run([sys.executable, __file__, "--weights", str(args.weights),
                                  "--dim", str(args.dim), "--density", str(args.density),
                                  "--one", method, str(touched)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    path = Path(__file__).resolve().parent / "results" / "update_synthetic.json"
    path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
