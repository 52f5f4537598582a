"""The blocks of weights a rank holds: local shards of sharded embedding tables, addressed by
their global offsets, and the model's dense parameters.

Everything that touches table weights from outside the model (initialisation, the sparsity
masks) goes through `local_table_shards`, whatever the sharding type. A shard is found through
the embedding kernels that TorchRec's sharded collections run (torchrec_internals.py), so it
also carries the kernel that looks it up and that kernel's optimizer state. `dense_blocks`
presents dense parameters (replicated by DDP) the same way, as one-shard tables, so that masks
treat both alike.
"""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import nn
from torchrec.optim.keyed import KeyedOptimizer

from dsl_dist.config import ConfigError
from dsl_dist.model.torchrec_internals import (Kernel, dense_kernel_gradient, embedding_kernels,
                                               is_replicated, kernel_tables, kernel_weights,
                                               optimizer_states)

INIT_BLOCK_ROWS = 4096


@dataclass
class TableShard:
    """One rank's block of one table: rows [row_offset, +num_rows), columns [col_offset,
    +num_cols) of a (table_rows × table_cols) table."""

    table: str
    row_offset: int
    col_offset: int
    num_rows: int
    num_cols: int
    table_rows: int
    table_cols: int
    weight: torch.Tensor
    """The live weights (writing it writes the model)."""
    kernel: Kernel
    """The TorchRec kernel that looks this shard up."""
    index: int
    """Position of this shard among the kernel's tables."""

    @property
    def replicated(self) -> bool:
        """Data-parallel tables: every rank holds and updates a full copy."""
        return is_replicated(self.kernel)

    def optimizer_states(self) -> list[torch.Tensor]:
        """Views of the fused optimizer's state for this shard (per element or per row);
        empty for data-parallel shards, whose optimizer is a separate dense one."""
        return [] if self.replicated else optimizer_states(self.kernel, self.index)

    def gradient(self) -> torch.Tensor | None:
        """This shard's gradient, for data-parallel shards (DDP's mean over the ranks); None
        otherwise."""
        return dense_kernel_gradient(self.kernel, self.weight) if self.replicated else None


@dataclass
class DenseBlock:
    """A dense parameter of the model as a table held whole by every rank: a matrix as it is,
    a vector as one column. Its gradient is DDP's mean over the ranks."""

    table: str
    """The parameter's name in the (unwrapped) model."""
    parameter: nn.Parameter
    optimizer: Optional[KeyedOptimizer]
    """The unfused optimizer that updates it (its state is reset where masks change)."""

    replicated = True
    row_offset = col_offset = 0

    @property
    def weight(self) -> torch.Tensor:
        return self.parameter.data.view(self.num_rows, self.num_cols)

    @property
    def num_rows(self) -> int:
        return self.parameter.shape[0]

    @property
    def num_cols(self) -> int:
        return self.parameter[0].numel()

    table_rows, table_cols = num_rows, num_cols

    def optimizer_states(self) -> list[torch.Tensor]:
        """Views of the optimizer's per-weight state (Adagrad sums, Adam moments)."""
        state = self.optimizer.state.get(self.parameter, {}) if self.optimizer else {}
        return [t.view(self.num_rows, self.num_cols) for t in state.values()
                if isinstance(t, torch.Tensor) and t.numel() == self.parameter.numel()]

    def gradient(self) -> torch.Tensor | None:
        grad = self.parameter.grad
        return None if grad is None else grad.view(self.num_rows, self.num_cols)


WeightBlock = Union[TableShard, DenseBlock]


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of a (DMP-wrapped) model that are not embedding tables, by their name in
    the plain model."""
    module = getattr(model, "module", model)
    return {name: p for name, p in module.named_parameters() if "embedding_bags" not in name}


def dense_blocks(model: nn.Module, patterns: list[str],
                 optimizer: Optional[KeyedOptimizer]) -> list[DenseBlock]:
    """The dense parameters whose names match any of the glob `patterns` (e.g. `tower.*`), as
    blocks; a pattern that matches none is refused (`sparsity.dense_parameters`)."""
    params = dense_parameters(model)
    for pattern in patterns:
        if not fnmatch.filter(params, pattern):
            raise ConfigError(f"sparsity.dense_parameters={list(patterns)!r}: {pattern!r} matches "
                              f"no dense parameter; the model has {sorted(params) or 'none'}")
    return [DenseBlock(name, p, optimizer) for name, p in sorted(params.items())
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]


def local_table_shards(model: nn.Module) -> list[TableShard]:
    """This rank's shards of every embedding table of a DistributedModelParallel model."""
    shards = []
    for kernel in embedding_kernels(model):
        for index, (table, weight) in enumerate(zip(kernel_tables(kernel),
                                                    kernel_weights(kernel))):
            shards.append(TableShard(table.name, table.row_offset, table.col_offset,
                                     table.local_rows, table.local_cols, table.num_embeddings,
                                     table.embedding_dim, weight, kernel, index))
    return sorted(shards, key=lambda s: (s.table, s.row_offset, s.col_offset))


def initial_rows(table: str, cols: int, start: int, stop: int, std: float,
                 seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, values) of rows [start, stop) of `table`'s initial weights, Normal(0, std),
    a piece at a time. Rows are drawn in blocks of INIT_BLOCK_ROWS from a generator seeded by
    (seed, table, block), so a weight's initial value depends only on its global position."""
    if stop <= start:
        return
    table_seed = zlib.crc32(table.encode())
    for block in range(start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS + 1):
        generator = torch.Generator().manual_seed(hash((seed, table_seed, block)) & (2**63 - 1))
        values = torch.randn(INIT_BLOCK_ROWS, cols, generator=generator) * std
        first = max(start, block * INIT_BLOCK_ROWS)
        last = min(stop, (block + 1) * INIT_BLOCK_ROWS)
        yield first, values[first - block * INIT_BLOCK_ROWS: last - block * INIT_BLOCK_ROWS]


@torch.no_grad()
def init_normal_(shards: list[TableShard], std: float, seed: int) -> None:
    """Fills every shard with its part of the tables' initial weights (`initial_rows`), so any
    sharding or world size gives the same tables."""
    for shard in shards:
        for first, values in initial_rows(shard.table, shard.table_cols, shard.row_offset,
                                          shard.row_offset + shard.num_rows, std, seed):
            local = first - shard.row_offset
            shard.weight[local:local + len(values)].copy_(
                values[:, shard.col_offset:shard.col_offset + shard.num_cols])
