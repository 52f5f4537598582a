"""Hooks on the embedding kernels of block pools: translate proxy ids to slots, record growth.

Each kernel that looks pool shards up receives, after TorchRec's input distribution, the proxy
ids of its rows under J block features per original feature (pool.py). A forward
pre-hook hands the kernel the same bags with every id replaced by its block's slot, or by the
shard's zero slot where the block is inactive (it pools to zeros; whatever the optimizer then
writes there is zeroed before the next lookup): the bags keep their sizes, so a step neither
reads the device back nor makes shapes that depend on the data. While `capturing`, it also
marks the ids of each row's last active block and of the block it would grow next; a hook on
the kernel's output gradient then adds |gradient| summed over those blocks (per row: sum over
the step's bags, absolute value, sum over the block's columns, as weight-level DSL scores each
weight) into the shards' growth statistics.

A kernel's features come table by table, so each pool shard's features are one contiguous run
of bags and ids: the hooks work on each run at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torchrec import KeyedJaggedTensor

from dsl_dist.model.torchrec_internals import Kernel, kernel_tables
from dsl_dist.sparsity.block.shard import PoolShard
from dsl_dist.sparsity.row_sums import sum_by_row


_CACHED = 8
"""Per-id tensors a run keeps (for as many distinct batch shapes)."""


@dataclass
class _Run:
    """Features [first, stop) of a kernel: one table's, pooled by `shard` (or not pooled), whose
    outputs start at column `first_column`, `width` columns each."""

    first: int
    stop: int
    first_column: int
    width: int
    shard: Optional[PoolShard]
    _per_bag: dict = field(default_factory=dict)
    _per_id: dict = field(default_factory=dict)

    def per_bag(self, kind: str, stride: int, device: torch.device) -> torch.Tensor:
        """For each bag of the run's features (`stride` per feature), its `block` position,
        its `bag` (sample) index or its block's output `columns`; made once."""
        key = (kind, stride, device)
        if key not in self._per_bag:
            feature = torch.arange(self.stop - self.first, device=device)
            if kind == "bag":
                self._per_bag[key] = torch.arange(stride, device=device).repeat(len(feature))
            else:  # a value per feature (columns: (bags, width)), the same for its bags
                of_feature = (feature % self.shard.geometry.blocks_per_row if kind == "block"
                              else (self.first_column + feature * self.width)[:, None]
                              + torch.arange(self.width, device=device))
                self._per_bag[key] = of_feature.repeat_interleave(stride, 0)
        return self._per_bag[key]

    def per_id(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """make(), kept for the next lookups with the same ids per feature (the same `key`):
        a stream of fixed-size batches computes it once."""
        if key not in self._per_id:
            if len(self._per_id) == _CACHED:
                self._per_id.pop(next(iter(self._per_id)))  # the oldest
            self._per_id[key] = make()
        return self._per_id[key]


@dataclass
class _Captured:
    """A step's ids of one pool shard, for the growth statistics."""

    shard: PoolShard
    rows: torch.Tensor
    samples: torch.Tensor
    columns: torch.Tensor
    """(ids, block) output columns of each id's block."""
    weights: Optional[torch.Tensor]
    """The ids' per-sample weights (unweighted pools: None)."""
    roles: torch.Tensor
    """(ids, 2) float: 1.0 where the id's block is its row's next one (grow_next wants it),
    then where it is the row's last active one (grow_last); 0.0 elsewhere."""


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

    def _translate(self, kernel: Kernel, args: tuple) -> tuple:
        capture = self.capturing and torch.is_grad_enabled()  # no capture in evaluation
        with torch.no_grad():
            return self._translated(kernel, args, capture)

    def _translated(self, kernel: Kernel, args: tuple, capture: bool) -> tuple:
        features: KeyedJaggedTensor = args[0]
        stride, offsets = features.stride(), features.offset_per_key()
        lengths, values, weights = features.lengths(), features.values(), features.weights_or_none()
        pieces, captured = [], []
        for run in self._runs[id(kernel)]:
            ids = values[offsets[run.first]:offsets[run.stop]]
            if run.shard is None:
                pieces.append(ids)
                continue
            run.shard.clear_zero_slot()
            slots, part = translate_run(
                run, ids, None if weights is None else
                weights[offsets[run.first]:offsets[run.stop]],
                features.length_per_key()[run.first:run.stop], lengths, stride, capture)
            pieces.append(slots)
            if part is not None:
                captured.append(part)
        if captured:
            self._captured[id(kernel)] = captured
        translated = KeyedJaggedTensor(
            keys=features.keys(), values=torch.cat(pieces) if len(pieces) > 1 else pieces[0],
            weights=weights, lengths=lengths, offsets=features.offsets_or_none(),
            stride=stride, length_per_key=features.length_per_key_or_none(),
            offset_per_key=offsets)
        return (translated, *args[1:])

    def _on_output(self, kernel: Kernel, args: tuple, output: torch.Tensor) -> None:
        captured = self._captured.pop(id(kernel), None)
        if captured and output.requires_grad:
            output.register_hook(lambda grad: _record(grad, captured))


def translate_run(run: _Run, ids: torch.Tensor, weights: torch.Tensor | None,
                  counts: list[int], lengths: torch.Tensor, stride: int, capture: bool
                  ) -> tuple[torch.Tensor, _Captured | None]:
    """The slots of a run's ids (`counts` per feature: its features' J block features,
    block after block, all holding the proxies of their rows): the block's slot where it
    is active, the zero slot where not; and, when capturing, what growth wants of them.
    `lengths`: the kernel's bag lengths."""
    shard = run.shard
    bag_lengths = lengths[run.first * stride:run.stop * stride]

    def of_each_id(kind: str) -> torch.Tensor:
        return run.per_id((kind, tuple(counts), ids.device), lambda: torch.repeat_interleave(
            run.per_bag(kind, stride, ids.device), bag_lengths, dim=0, output_size=len(ids)))

    block = of_each_id("block")
    rows = shard.local_rows(ids)
    widths = shard.widths[rows]
    slots = (shard.rowptr[rows] + block).masked_fill_(block >= widths, shard.zero_slot)
    if not capture:
        return slots, None
    # every id, its block weighted 1 where it is the row's next block (or its last active
    # one) and 0 elsewhere: no subset whose size is data
    roles = torch.stack([block == widths, block + 1 == widths], 1).float()
    return slots, _Captured(shard, rows, of_each_id("bag"), of_each_id("columns"), weights,
                            roles)


@torch.no_grad()
def _record(grad: torch.Tensor, captured: list[_Captured]) -> None:
    """Adds the step's |gradient| of every captured block to its row's statistic."""
    for part in captured:
        sampled = grad[part.samples[:, None], part.columns].float()
        if part.weights is not None:
            sampled = sampled * part.weights[:, None]
        # both statistics' gradients side by side: one grouping by row for the two
        by_role = (part.roles[:, :, None] * sampled[:, None, :]).flatten(1)
        rows, summed = sum_by_row(part.rows, by_role)
        scores = summed.abs_().view(len(rows), 2, -1).sum(2)
        for role, statistic in enumerate((part.shard.grow_next, part.shard.grow_last)):
            statistic.index_add_(0, rows, scores[:, role].to(statistic.dtype))
