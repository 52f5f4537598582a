"""Every access to TorchRec's and FBGEMM's non-public internals, in one place.

DSL works on the weights of each rank's table shards, which TorchRec does not expose as a
public API: they live in the FBGEMM kernels behind a sharded collection's lookups. Everything
here reads attributes that a TorchRec or FBGEMM upgrade may rename (checked against TorchRec
1.8 / FBGEMM 1.8, the pinned versions); nothing outside this module touches them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

Kernel = BaseBatchedEmbeddingBag
"""An FBGEMM-backed kernel that looks up one or more local table shards."""


@dataclass(frozen=True)
class KernelTable:
    """One table shard a kernel looks up: its place in the table and the features it serves."""

    name: str
    row_offset: int
    col_offset: int
    local_rows: int
    local_cols: int
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple[str, ...]


def embedding_kernels(model: nn.Module) -> list[Kernel]:
    """The batched embedding kernels inside the sharded collections of `model`."""
    kernels = []
    for module in model.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            for lookup in module._lookups:  # not registered as submodules by TorchRec
                inner = getattr(lookup, "module", lookup)  # data-parallel lookups are DDP-wrapped
                kernels += [m for m in inner.modules() if isinstance(m, BaseBatchedEmbeddingBag)]
    return kernels


def kernel_tables(kernel: Kernel) -> list[KernelTable]:
    """The table shards of `kernel`, in the order of its weights and output columns."""
    tables = []
    for table in kernel.config.embedding_tables:
        row, col = table.local_metadata.shard_offsets if table.local_metadata else (0, 0)
        tables.append(KernelTable(table.name, row, col, table.local_rows, table.local_cols,
                                  table.num_embeddings, table.embedding_dim,
                                  tuple(table.feature_names)))
    return tables


def kernel_weights(kernel: Kernel) -> list[torch.Tensor]:
    """The live weights of each of the kernel's table shards (writing them writes the model)."""
    return list(kernel.split_embedding_weights())


def is_replicated(kernel: Kernel) -> bool:
    """Data-parallel tables: a dense kernel, whose weights every rank holds and updates."""
    return kernel.config.compute_kernel == EmbeddingComputeKernel.DENSE


def optimizer_states(kernel: Kernel, index: int) -> list[torch.Tensor]:
    """Views of the fused optimizer's state of the kernel's `index`-th shard (per element or
    per row)."""
    return list(kernel.emb_module.split_optimizer_states()[index])


def dense_kernel_gradient(kernel: Kernel, weight: torch.Tensor) -> torch.Tensor | None:
    """The gradient of `weight` (a shard of a dense kernel: its weights are slices of one
    ordinary parameter, whose gradient DDP averages over the ranks)."""
    flat = kernel.emb_module.weights
    if flat.grad is None:
        return None
    start = (weight.data_ptr() - flat.data_ptr()) // flat.element_size()
    return flat.grad[start:start + weight.numel()].view_as(weight)
