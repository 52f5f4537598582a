"""The unstructured update on the device (torch) path, the one a GPU takes, run here on CPU
tensors: its extra memory follows `sparsity.update_memory_mb`, not the table, and chunking
changes no choice.

Beyond the budget an update holds, for the whole shard, a few packed masks (a bit a weight
each: the drop's and the grow's choices and one temporary) and a few radix histograms of 2^16
int64 counts: the slack below."""

from __future__ import annotations

from typing import Any

import torch

from dsl_dist.distributed import init_distributed, shutdown_distributed
from dsl_dist.memory import tensor_peak
from dsl_dist.sparsity.selection.fastops import device_path
from synthetic_table import build, randomise_growth

ROWS, DIM = 40_000, 32
"""1.28M weights: 5 MiB of weights, 20 chunks of the smallest budget."""
BUDGET_MB = 1
PACKED_MASKS = 3
HISTOGRAMS_MB = 2


def update_on_the_device_path(update_memory_mb: int) -> dict[str, Any]:
    """One update of a dsl catalogue whose growth statistic is set on 10% of the rows (the
    rest tie at 0, as in training), with its masks, weights and peak of tensor bytes."""
    ctx = init_distributed("gloo")
    try:
        with device_path():
            dsl = build("dsl", ctx, ROWS, DIM, 0.2, update_memory_mb=update_memory_mb)
            randomise_growth(dsl, touched=0.1)
            with tensor_peak() as found:
                record = dsl.update(1)
        return {"peak": found.peak, "record": record,
                "bits": [s.bits.clone() for s in dsl.shards],
                "dropped": [s.dropped_bits.clone() for s in dsl.shards],
                "weights": [s.shard.weight.detach().clone() for s in dsl.shards]}
    finally:
        shutdown_distributed()


def test_the_update_keeps_to_its_memory_budget_and_chooses_as_one_chunk_does() -> None:
    chunked = update_on_the_device_path(BUDGET_MB)
    whole = update_on_the_device_path(1024)  # one chunk: the whole table at once
    weights = ROWS * DIM
    assert chunked["record"]["grown"] > 0
    for key in ("active", "dropped", "grown", "regrown", "mask_digest"):
        assert chunked["record"][key] == whole["record"][key], key
    for key in ("bits", "dropped", "weights"):
        assert all(torch.equal(a, b) for a, b in zip(chunked[key], whole[key])), key
    bound = (BUDGET_MB + HISTOGRAMS_MB) * 2**20 + PACKED_MASKS * weights // 8
    assert chunked["peak"] <= bound, (chunked["peak"], bound)
    assert whole["peak"] > 4 * bound  # what the bound rules out: temporaries of the table
