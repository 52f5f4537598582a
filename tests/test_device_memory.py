"""Memory on the device (torch) path, the one a GPU takes, run here on CPU tensors (counted
by `tensor_peak` from torch's allocator): what each method keeps beyond the tables is its
declared state and follows the budget, and the unstructured update's extra memory follows
`sparsity.update_memory_mb`, not the table, with the choices of a single chunk.

Beyond its budget an update holds, for the whole shard, a few packed masks (a bit a weight
each: the drop's and the grow's choices and one temporary) and a few radix histograms of 2^16
int64 counts: the slack below."""

from __future__ import annotations

import gc
from typing import Any

import torch

from dsl_dist.distributed import init_distributed, shutdown_distributed
from dsl_dist.memory import tensor_peak
from dsl_dist.sparsity.selection.exact import BINS
from dsl_dist.sparsity.selection.fastops import device_path
from synthetic_table import build, randomise_growth

ROWS, DIM = 40_000, 32
"""1.28M weights: 5 MiB of weights, 40 chunks of the smallest budget."""
WEIGHTS = ROWS * DIM
BUDGET_MB = 1
PACKED_MASKS = 3
HISTOGRAMS_MB = 2
RETAINED = (BINS + 2) * 8
"""The last counts a selection all-reduced, which the process group may keep (a histogram)."""
ADAM_BYTES = 12
"""Bytes a weight of a dense table with Adam (the GPU's optimizer): the GPU targets'
denominator (dsl <= 1.3x dense, block_dsl <= 0.5x dense)."""


def update_on_the_device_path(update_memory_mb: int) -> dict[str, Any]:
    """One update of a dsl catalogue whose growth statistic is set on 10% of the rows (the
    rest tie at 0, as in training), with its masks, weights and peak of tensor bytes."""
    ctx = init_distributed("gloo")
    try:
        with device_path():
            _, dsl = build("dsl", ctx, ROWS, DIM, 0.2, update_memory_mb=update_memory_mb)
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
    assert chunked["record"].grown > 0
    for key in ("active", "dropped", "grown", "regrown", "mask_digest"):
        assert getattr(chunked["record"], key) == getattr(whole["record"], key), key
    for key in ("bits", "dropped", "weights"):
        assert all(torch.equal(a, b) for a, b in zip(chunked[key], whole[key])), key
    bound = (BUDGET_MB + HISTOGRAMS_MB) * 2**20 + PACKED_MASKS * WEIGHTS // 8
    assert chunked["peak"] <= bound, (chunked["peak"], bound)
    assert whole["peak"] > 4 * bound  # what the bound rules out: temporaries of the table


def kept_on_the_device(method: str) -> tuple[int, int]:
    """Bytes of the tensors a method's build leaves allocated (tables, optimizer state and
    sparsity state: all, as the allocator counts them) and its declared sparsity state."""
    ctx = init_distributed("gloo")
    try:
        with device_path():
            gc.collect()  # nothing of an earlier build left to be freed within this count
            with tensor_peak() as found:
                model, sparsity = build(method, ctx, ROWS, DIM, 0.2)
                gc.collect()  # what only reference cycles hold is not kept
        del model
        return found.left, sparsity.memory_bytes()
    finally:
        shutdown_distributed()


def test_what_a_method_keeps_beyond_the_tables_is_its_declared_state() -> None:
    """dsl keeps dense's table and optimizer state plus its masks and growth statistic, and no
    more (at most 0.3x of a dense table with Adam, the GPU's optimizer: the GPU target of
    1.3x); block_dsl its pools and per-row layout, at most half of dense's."""
    dense, _ = kept_on_the_device("dense")
    dsl, dsl_state = kept_on_the_device("dsl")
    block, block_state = kept_on_the_device("block_dsl")
    assert dense >= 4 * WEIGHTS  # the float32 table is counted
    assert 0 <= dsl - dense - dsl_state <= RETAINED, (dsl, dense, dsl_state)
    assert dsl_state <= 0.3 * ADAM_BYTES * WEIGHTS
    assert block_state < block <= 0.5 * dense + RETAINED, (block, dense)
