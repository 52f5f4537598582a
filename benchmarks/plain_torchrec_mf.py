"""BPR-MF as a user writes it by hand on TorchRec: the yardstick of the GPU check's throughput.

Two tables of gowalla's size (29,858 users, 40,981 items; dimension 64), one negative item per
positive, FBGEMM's fused row-wise Adagrad (`apply_optimizer_in_backward`, as TorchRec's own
examples do), table-wise sharding under DistributedModelParallel at world size 1, and random
ids drawn on the host. Every step copies its batch to the device, runs forward and backward
(which updates the tables) and reads the loss with `loss.item()`: the plain loop, no pipeline.

    python benchmarks/plain_torchrec_mf.py --batch 2048 32768

prints one JSON line per batch size (samples/s over the timed steps, after warm-up steps).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

USERS, ITEMS, DIM = 29_858, 40_981, 64
LR, L2 = 0.05, 1e-4
HOST_BATCHES = 8
"""Distinct random batches drawn once and cycled: drawing ids is not what is measured."""


class HandWrittenMF(nn.Module):
    """score(u, i) = <e_u, e_i>; the item table serves the `pos` and `neg` features."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = EmbeddingBagCollection(device=torch.device("meta"), tables=[
            EmbeddingBagConfig(name="user", embedding_dim=DIM, num_embeddings=USERS,
                               feature_names=["user"]),
            EmbeddingBagConfig(name="item", embedding_dim=DIM, num_embeddings=ITEMS,
                               feature_names=["pos", "neg"])])

    def forward(self, batch: KeyedJaggedTensor) -> torch.Tensor:
        out = self.tables(batch)
        user, pos, neg = out["user"], out["pos"], out["neg"]
        margin = (user * neg).sum(1) - (user * pos).sum(1)
        norms = user.square().sum() + pos.square().sum() + neg.square().sum()
        return functional.softplus(margin).mean() + L2 * 0.5 * norms / user.shape[0]


def sharded_model(device: torch.device) -> nn.Module:
    model = HandWrittenMF()
    apply_optimizer_in_backward(RowWiseAdagrad, model.tables.parameters(), {"lr": LR})
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device=device.type),
        constraints={name: ParameterConstraints(sharding_types=["table_wise"])
                     for name in ("user", "item")})
    plan = planner.collective_plan(model, pg=dist.group.WORLD)
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                    device=device, plan=plan)


def random_batch(batch: int, generator: torch.Generator) -> KeyedJaggedTensor:
    ids = [torch.randint(0, n, (batch,), generator=generator) for n in (USERS, ITEMS, ITEMS)]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "pos", "neg"], values=torch.cat(ids),
        lengths=torch.ones(3 * batch, dtype=torch.int32))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """samples/s of the plain loop over `steps` steps after `warmup` steps, in a process group
    of one made here (the caller must hold none)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model = sharded_model(device)
        generator = torch.Generator().manual_seed(0)
        host = [random_batch(batch, generator) for _ in range(HOST_BATCHES)]
        for step in range(warmup + steps):
            if step == warmup:
                _synchronize(device)
                started = time.perf_counter()
            loss = model(host[step % HOST_BATCHES].to(device))
            loss.backward()
            loss.item()
        _synchronize(device)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        return {"batch": batch, "steps": steps, "seconds": seconds,
                "samples_per_s": batch * steps / seconds, "peak_cuda_mb": peak}
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[2048, 32768])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for batch in args.batch:
        print(json.dumps(measure(device, batch, args.steps, args.warmup)), flush=True)


if __name__ == "__main__":
    main()
