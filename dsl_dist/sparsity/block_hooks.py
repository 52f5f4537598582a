"""Hooks on the embedding kernels of block pools: translate proxy ids to slots, record growth.

Each kernel that looks pool shards up receives, after TorchRec's input distribution, the proxy
ids of its rows under J block features per original feature (block_pool.py). A forward
pre-hook hands the kernel the same bags with every id replaced by its block's slot, and
without the ids of inactive blocks (an emptied bag pools to zeros, and nothing is updated
there). While `capturing`, it also notes the ids of each row's last active block and of the
block it would grow next; a hook on the kernel's output gradient then adds |gradient| summed
over those blocks (per row: sum over the step's bags, absolute value, sum over the block's
columns, as weight-level DSL scores each weight) into the shards' growth statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torchrec import KeyedJaggedTensor

from dsl_dist.model.torchrec_internals import Kernel, kernel_tables
from dsl_dist.sparsity.block_shard import PoolShard


@dataclass
class _Feature:
    """A kernel feature: its output columns, and the pool shard and block position it reads
    (None for a table that is not pooled)."""

    first_column: int
    width: int
    shard: Optional[PoolShard]
    block: int


@dataclass
class _Captured:
    """The ids of one step whose gradient the growth statistics want."""

    shard: PoolShard
    rows: torch.Tensor
    samples: torch.Tensor
    columns: torch.Tensor
    weights: Optional[torch.Tensor]
    next_block: torch.Tensor
    """True: the row's next block (grow_next); False: its last active block (grow_last)."""


class PoolKernelHooks:
    """Translation and growth recording for every kernel that looks `shards` up."""

    def __init__(self, kernels: list[Kernel], shards: list[PoolShard]) -> None:
        self.capturing = False
        by_kernel = {(id(s.shard.kernel), s.shard.index): s for s in shards}
        self._features: dict[int, list[_Feature]] = {}
        self._captured: dict[int, list[_Captured]] = {}
        self._handles = []
        for kernel in kernels:
            features, column = [], 0
            for index, table in enumerate(kernel_tables(kernel)):
                shard = by_kernel.get((id(kernel), index))
                blocks = shard.geometry.blocks_per_row if shard else 1
                for position, _ in enumerate(table.feature_names):
                    features.append(_Feature(column, table.local_cols, shard, position % blocks))
                    column += table.local_cols
            if any(f.shard for f in features):
                self._features[id(kernel)] = features
                self._handles += [kernel.register_forward_pre_hook(self._translate),
                                  kernel.register_forward_hook(self._on_output)]

    @torch.no_grad()
    def _translate(self, kernel: Kernel, args: tuple) -> tuple:
        features: KeyedJaggedTensor = args[0]
        capture = self.capturing and torch.is_grad_enabled()
        stride = features.stride()
        lengths = features.lengths().view(-1, stride)
        offsets = features.offset_per_key()
        values, weights = features.values(), features.weights_or_none()
        new_values, new_lengths, new_weights, captured = [], [], [], []
        for f, feature in enumerate(self._features[id(kernel)]):
            ids = values[offsets[f]:offsets[f + 1]]
            w = None if weights is None else weights[offsets[f]:offsets[f + 1]]
            if feature.shard is None:
                new_values.append(ids)
                new_lengths.append(lengths[f])
                new_weights.append(w)
                continue
            shard, block = feature.shard, feature.block
            rows = shard.local_rows(ids)
            widths = shard.widths[rows].to(torch.int64)
            keep = widths > block
            samples = torch.repeat_interleave(torch.arange(stride), lengths[f],
                                              output_size=len(ids))
            if capture:
                wanted = (widths == block) | (widths == block + 1)
                if bool(wanted.any()):
                    captured.append(_Captured(
                        shard, rows[wanted], samples[wanted],
                        feature.first_column + torch.arange(feature.width), None if w is None
                        else w[wanted], (widths == block)[wanted]))
            new_values.append(shard.slots(rows[keep], block))
            new_lengths.append(torch.bincount(samples[keep], minlength=stride).to(lengths.dtype))
            new_weights.append(None if w is None else w[keep])
        if captured:
            self._captured[id(kernel)] = captured
        translated = KeyedJaggedTensor.from_lengths_sync(
            keys=features.keys(), values=torch.cat(new_values), lengths=torch.cat(new_lengths),
            weights=None if weights is None else torch.cat(new_weights))
        return (translated, *args[1:])

    def _on_output(self, kernel: Kernel, args: tuple, output: torch.Tensor) -> None:
        captured = self._captured.pop(id(kernel), None)
        if captured and output.requires_grad:
            output.register_hook(lambda grad: _record(grad, captured))


@torch.no_grad()
def _record(grad: torch.Tensor, captured: list[_Captured]) -> None:
    """Adds the step's |gradient| of every captured block to its row's statistic."""
    for part in captured:
        sampled = grad[part.samples[:, None], part.columns[None, :]].float()
        if part.weights is not None:
            sampled = sampled * part.weights[:, None]
        for next_block, statistic in ((True, part.shard.grow_next),
                                      (False, part.shard.grow_last)):
            chosen = part.next_block == next_block
            if not bool(chosen.any()):
                continue
            rows, inverse = torch.unique(part.rows[chosen], return_inverse=True)
            summed = torch.zeros(len(rows), sampled.shape[1]).index_add_(
                0, inverse, sampled[chosen])
            statistic[rows] = (statistic[rows].float() + summed.abs_().sum(1)).to(statistic.dtype)

