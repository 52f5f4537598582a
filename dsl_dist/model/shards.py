"""The blocks of weights a rank holds: local shards of sharded embedding tables, addressed by
their global offsets, and the model's dense parameters.

Everything that touches table weights from outside the model (initialisation, the sparsity
masks) goes through `local_table_shards`, whatever the sharding type. A shard is found through
the embedding kernels that TorchRec's sharded collections run, so it also carries the kernel
that looks it up and that kernel's optimizer state. `dense_blocks` presents dense parameters
(replicated by DDP) the same way, as one-shard tables, so that masks treat both alike.
"""

from __future__ import annotations

import zlib
import fnmatch
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.optim.keyed import KeyedOptimizer

from dsl_dist.config import ConfigError

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
    kernel: BaseBatchedEmbeddingBag
    """The TorchRec kernel that looks this shard up."""
    index: int
    """Position of this shard among the kernel's tables."""

    @property
    def replicated(self) -> bool:
        """Data-parallel tables: every rank holds and updates a full copy."""
        return self.kernel.config.compute_kernel == EmbeddingComputeKernel.DENSE

    @property
    def feature_names(self) -> list[str]:
        return list(self.kernel.config.embedding_tables[self.index].feature_names)

    def optimizer_states(self) -> list[torch.Tensor]:
        """Views of the fused optimizer's state for this shard (per element or per row);
        empty for data-parallel shards, whose optimizer is a separate dense one."""
        if self.replicated:
            return []
        return list(self.kernel.emb_module.split_optimizer_states()[self.index])

    def gradient(self) -> torch.Tensor | None:
        """This shard's gradient, for data-parallel shards (the dense kernel's weights are an
        ordinary parameter whose gradient DDP averages over ranks); None otherwise."""
        flat = self.kernel.emb_module.weights
        if not self.replicated or flat.grad is None:
            return None
        start = (self.weight.data_ptr() - flat.data_ptr()) // flat.element_size()
        return flat.grad[start:start + self.weight.numel()].view_as(self.weight)


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


def embedding_kernels(model: nn.Module) -> list[BaseBatchedEmbeddingBag]:
    """The batched embedding kernels inside the sharded collections of `model`."""
    kernels = []
    for module in model.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            for lookup in module._lookups:  # not registered as submodules by TorchRec
                inner = getattr(lookup, "module", lookup)  # data-parallel lookups are DDP-wrapped
                kernels += [m for m in inner.modules() if isinstance(m, BaseBatchedEmbeddingBag)]
    return kernels


def local_table_shards(model: nn.Module) -> list[TableShard]:
    """This rank's shards of every embedding table of a DistributedModelParallel model."""
    shards = []
    for kernel in embedding_kernels(model):
        for index, (table, weight) in enumerate(zip(kernel.config.embedding_tables,
                                                    kernel.split_embedding_weights())):
            row, col = table.local_metadata.shard_offsets if table.local_metadata else (0, 0)
            shards.append(TableShard(table.name, row, col, table.local_rows, table.local_cols,
                                     table.num_embeddings, table.embedding_dim, weight, kernel,
                                     index))
    return sorted(shards, key=lambda s: (s.table, s.row_offset, s.col_offset))


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
