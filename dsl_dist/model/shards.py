"""The local shards of sharded embedding tables, addressed by their global offsets.

Everything that touches table weights from outside the model (initialisation, and later the
sparsity masks) goes through `local_table_shards`, whatever the sharding type.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

INIT_BLOCK_ROWS = 4096


@dataclass
class TableShard:
    """One rank's block of one table: rows [row_offset, +rows), columns [col_offset, +cols)."""

    table: str
    row_offset: int
    col_offset: int
    num_rows: int
    num_cols: int
    table_cols: int
    weight: torch.Tensor
    """The live weights (writing it writes the model)."""
    replicated: bool
    """True for data-parallel tables: every rank holds a full copy."""


def _table_name(state_key: str) -> str | None:
    parts = state_key.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] == "embedding_bags":
        return parts[-2]
    return None


def local_table_shards(model: nn.Module) -> list[TableShard]:
    """This rank's shards of every embedding table of a DistributedModelParallel model."""
    shards: list[TableShard] = []
    for key, value in model.state_dict(keep_vars=True).items():
        table = _table_name(key)
        if table is None:
            continue
        if isinstance(value, ShardedTensor):
            table_cols = value.size(1)
            for shard in value.local_shards():
                row, col = shard.metadata.shard_offsets
                rows, cols = shard.metadata.shard_sizes
                shards.append(TableShard(table, row, col, rows, cols, table_cols, shard.tensor,
                                         replicated=False))
        else:
            rows, cols = value.shape
            shards.append(TableShard(table, 0, 0, rows, cols, cols, value, replicated=True))
    return shards


@torch.no_grad()
def init_normal_(shards: list[TableShard], std: float, seed: int) -> None:
    """Fills every shard with Normal(0, std) weights that depend only on the global position.

    Rows are drawn in blocks of INIT_BLOCK_ROWS from a generator seeded by (seed, table,
    block), so a shard generates only the blocks it intersects and any sharding or world size
    gives the same table.
    """
    for shard in shards:
        first = shard.row_offset // INIT_BLOCK_ROWS
        last = (shard.row_offset + shard.num_rows - 1) // INIT_BLOCK_ROWS
        table_seed = zlib.crc32(shard.table.encode())
        for block in range(first, last + 1):
            generator = torch.Generator().manual_seed(hash((seed, table_seed, block)) & (2**63 - 1))
            values = torch.randn(INIT_BLOCK_ROWS, shard.table_cols, generator=generator) * std
            start = max(shard.row_offset, block * INIT_BLOCK_ROWS)
            stop = min(shard.row_offset + shard.num_rows, (block + 1) * INIT_BLOCK_ROWS)
            src = values[start - block * INIT_BLOCK_ROWS: stop - block * INIT_BLOCK_ROWS,
                         shard.col_offset: shard.col_offset + shard.num_cols]
            shard.weight[start - shard.row_offset: stop - shard.row_offset].copy_(src)
