"""Hooks on the embedding kernels of block pools: translate proxy ids to slots, record growth.

Each kernel that looks pool shards up receives, after TorchRec's input distribution, the proxy
ids of its rows under J block features per original feature (pool.py). A forward
pre-hook hands the kernel the same bags with every id replaced by its block's slot, and
without the ids of inactive blocks (an emptied bag pools to zeros, and nothing is updated
there). While `capturing`, it also notes the ids of each row's last active block and of the
block it would grow next; a hook on the kernel's output gradient then adds |gradient| summed
over those blocks (per row: sum over the step's bags, absolute value, sum over the block's
columns, as weight-level DSL scores each weight) into the shards' growth statistics.

A kernel's features come table by table, so each pool shard's features are one contiguous run
of bags and ids: the hooks work on each run at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torchrec import KeyedJaggedTensor

from dsl_dist.model.torchrec_internals import Kernel, kernel_tables
from dsl_dist.sparsity.block.shard import PoolShard


@dataclass
class _Run:
    """Features [first, stop) of a kernel: one table's, pooled by `shard` (or not pooled), whose
    outputs start at column `first_column`, `width` columns each."""

    first: int
    stop: int
    first_column: int
    width: int
    shard: Optional[PoolShard]


@dataclass
class _Captured:
    """The ids of one step whose gradient the growth statistics want."""

    shard: PoolShard
    rows: torch.Tensor
    samples: torch.Tensor
    columns: torch.Tensor
    """(ids, block) output columns of each id's block."""
    weights: Optional[torch.Tensor]
    next_block: torch.Tensor
    """True: the row's next block (grow_next); False: its last active block (grow_last)."""


class PoolKernelHooks:
    """Translation and growth recording for every kernel that looks `shards` up."""

    def __init__(self, kernels: list[Kernel], shards: list[PoolShard]) -> None:
        self.capturing = False
        by_kernel = {(id(s.shard.kernel), s.shard.index): s for s in shards}
        self._runs: dict[int, list[_Run]] = {}
        self._captured: dict[int, list[_Captured]] = {}
        self._handles = []
        for kernel in kernels:
            runs, feature, column = [], 0, 0
            for index, table in enumerate(kernel_tables(kernel)):
                count = len(table.feature_names)
                runs.append(_Run(feature, feature + count, column, table.local_cols,
                                 by_kernel.get((id(kernel), index))))
                feature, column = feature + count, column + count * table.local_cols
            if any(r.shard for r in runs):
                self._runs[id(kernel)] = runs
                self._handles += [kernel.register_forward_pre_hook(self._translate),
                                  kernel.register_forward_hook(self._on_output)]

    @torch.no_grad()
    def _translate(self, kernel: Kernel, args: tuple) -> tuple:
        features: KeyedJaggedTensor = args[0]
        capture = self.capturing and torch.is_grad_enabled()
        stride = features.stride()
        lengths, offsets = features.lengths(), features.offset_per_key()
        values, weights = features.values(), features.weights_or_none()
        new_values, new_lengths, new_weights, captured = [], [], [], []
        for run in self._runs[id(kernel)]:
            blocks = run.shard.geometry.blocks_per_row if run.shard else run.stop - run.first
            for f in range(run.first, run.stop, blocks):  # a virtual feature's J block features
                ids = values[offsets[f]:offsets[f + 1]]  # block 0's ids: every block has them
                w = None if weights is None else weights[offsets[f]:offsets[f + 1]]
                bag_lengths = lengths[f * stride:(f + blocks) * stride]
                if run.shard is None:
                    new_values.append(values[offsets[f]:offsets[f + blocks]])
                    new_lengths.append(bag_lengths)
                    new_weights.append(None if weights is None else
                                       weights[offsets[f]:offsets[f + blocks]])
                    continue
                parts = self._translate_feature(run, f - run.first, ids, w,
                                                bag_lengths[:stride], stride, capture)
                new_values.append(parts[0])
                new_lengths.append(parts[1].to(lengths.dtype))
                new_weights.append(parts[2])
                if parts[3] is not None:
                    captured.append(parts[3])
        if captured:
            self._captured[id(kernel)] = captured
        translated = KeyedJaggedTensor.from_lengths_sync(
            keys=features.keys(), values=torch.cat(new_values), lengths=torch.cat(new_lengths),
            weights=None if weights is None else torch.cat(new_weights))
        return (translated, *args[1:])

    @staticmethod
    def _translate_feature(run: _Run, feature: int, ids: torch.Tensor, w: torch.Tensor | None,
                           bag_lengths: torch.Tensor, stride: int, capture: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                      _Captured | None]:
        """Slots, bag lengths and weights of one virtual feature's J block features (block
        after block), and what growth wants of them. `feature`: its first block feature's
        index within the run."""
        shard = run.shard
        rows = shard.local_rows(ids)
        widths = shard.widths[rows].to(torch.int64)
        block = torch.arange(shard.geometry.blocks_per_row, device=ids.device)[:, None]
        keep = block < widths[None, :]  # (J, ids)
        slots = (shard.rowptr[rows][None, :] + block)[keep]
        single = len(ids) == stride and bool((bag_lengths == 1).all())
        bags = None if single else torch.repeat_interleave(
            torch.arange(stride, device=ids.device), bag_lengths, output_size=len(ids))
        if single:
            new_lengths = keep.flatten()
        else:
            new_lengths = torch.bincount((bags[None, :] + block * stride)[keep],
                                         minlength=stride * len(block))
        new_weights = None if w is None else w.expand(len(block), -1)[keep]
        captured = None
        if capture:
            wanted = (widths[None, :] == block) | (widths[None, :] == block + 1)
            which_block, which_id = torch.nonzero(wanted, as_tuple=True)
            first_columns = run.first_column + (feature + which_block) * run.width
            captured = _Captured(
                shard, rows[which_id], which_id if single else bags[which_id],
                first_columns[:, None] + torch.arange(run.width, device=ids.device)[None, :],
                None if w is None else w[which_id], widths[which_id] == which_block)
        return slots, new_lengths, new_weights, captured

    def _on_output(self, kernel: Kernel, args: tuple, output: torch.Tensor) -> None:
        captured = self._captured.pop(id(kernel), None)
        if captured and output.requires_grad:
            output.register_hook(lambda grad: _record(grad, captured))


@torch.no_grad()
def _record(grad: torch.Tensor, captured: list[_Captured]) -> None:
    """Adds the step's |gradient| of every captured block to its row's statistic."""
    for part in captured:
        sampled = grad[part.samples[:, None], part.columns].float()
        if part.weights is not None:
            sampled = sampled * part.weights[:, None]
        for next_block, statistic in ((True, part.shard.grow_next),
                                      (False, part.shard.grow_last)):
            chosen = part.next_block == next_block
            if not bool(chosen.any()):
                continue
            rows, inverse = torch.unique(part.rows[chosen], return_inverse=True)
            summed = torch.zeros(len(rows), sampled.shape[1], device=sampled.device).index_add_(
                0, inverse, sampled[chosen])
            statistic[rows] = (statistic[rows].float() + summed.abs_().sum(1)).to(statistic.dtype)
