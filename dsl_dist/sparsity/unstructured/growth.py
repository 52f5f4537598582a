"""Row-level work on the embedding kernels' gradients: the growth signal, and keeping pruned
weights at zero.

FBGEMM's fused kernels update the tables inside backward and never materialise the tables'
gradients. A forward hook on each kernel sees the (local) row ids it looks up; a hook on its
output's gradient scatters dL/d(pooled output) back to those rows, which for sum pooling is
exactly the gradient of the weights, pruned positions included: the growth signal.

The same hook keeps pruned weights at zero. Where every bag holds one id (MF's lookups), the
pooled gradient of a sample is the gradient of exactly one row, so multiplying it by that
row's mask hands the fused optimizer a gradient that is zero at pruned positions: SGD and
Adagrad then leave them at zero, and row-wise Adagrad's accumulator sees only active weights.
Features with longer bags share a pooled gradient between rows, so their rows are re-masked
after the step instead (`take_touched_rows`), as are all rows when `mask_gradients` is off
(the default: see `UnstructuredConfig.mask_gradients`). Data-parallel tables are dense
parameters: their gradient is read directly and they are re-masked whole.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torchrec import KeyedJaggedTensor

from dsl_dist.model.torchrec_internals import kernel_tables
from dsl_dist.sparsity.row_sums import sum_by_row
from dsl_dist.sparsity.selection.fastops import concat
from dsl_dist.sparsity.unstructured.masks import MaskedShard


class GrowthRecorder:
    """Masks the gradients of single-id lookups, keeps the other rows touched since the last
    re-masking and, while `capturing`, adds each step's |gradient| (per weight) into the
    shards' `growth` statistic."""

    def __init__(self, shards: list[MaskedShard], world_size: int,
                 mask_gradients: bool = False) -> None:
        self.world_size = world_size
        self.mask_gradients = mask_gradients
        self.capturing = False
        self.replicated = [s for s in shards if s.shard.replicated]
        sharded = [s for s in shards if not s.shard.replicated]
        self._touched: dict[int, list[torch.Tensor]] = defaultdict(list)
        # Per kernel, its features in output-column order: (width, the sparsified shard or None).
        self._columns: dict[int, dict[str, tuple[int, MaskedShard | None]]] = {}
        kernels = {id(s.shard.kernel): s.shard.kernel for s in sharded}
        masked = {(id(s.shard.kernel), s.shard.index): s for s in sharded}
        for key, kernel in kernels.items():
            self._columns[key] = {
                feature: (table.local_cols, masked.get((key, index)))
                for index, table in enumerate(kernel_tables(kernel))
                for feature in table.feature_names}
        self._handles = [k.register_forward_hook(self._on_forward) for k in kernels.values()]

    def _on_forward(self, kernel: Any, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return  # evaluation: nothing will be updated
        features: KeyedJaggedTensor = inputs[0]
        columns = self._columns[id(kernel)]
        batch = features.stride()
        lengths = features.lengths().view(-1, batch)
        offsets = features.offset_per_key()
        values, weights = features.values(), features.weights_or_none()
        parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, slice, Any]]] = defaultdict(list)
        targets: dict[int, MaskedShard] = {}
        masked: list[tuple[torch.Tensor, slice, MaskedShard]] = []  # (ids, columns, shard)
        touched: dict[int, list[list[int]]] = defaultdict(list)  # value ranges, by shard
        column = 0
        for f, key in enumerate(features.keys()):
            width, shard = columns[key]
            if shard is not None:
                columns_f = slice(column, column + width)
                # whether every bag holds one id: a read of the device, asked only where
                # gradients are masked (sparsity.mask_gradients; off by default)
                single = (self.mask_gradients and offsets[f + 1] - offsets[f] == batch
                          and bool((lengths[f] == 1).all()))
                ids = values[offsets[f]:offsets[f + 1]].long() if single or self.capturing \
                    else None
                if single:
                    masked.append((ids, columns_f, shard))
                else:
                    _extend(touched[id(shard)], offsets[f], offsets[f + 1])
                if self.capturing:  # bags: the sample of each id (None: sample i holds id i)
                    bags = None if single else torch.repeat_interleave(
                        torch.arange(batch, device=ids.device), lengths[f],
                        output_size=ids.numel())
                    sample_weights = None if weights is None else weights[offsets[f]:offsets[f + 1]]
                    parts[id(shard)].append((ids, bags, columns_f, sample_weights))
                    targets[id(shard)] = shard
            column += width
        for key, ranges in touched.items():  # a shard's adjacent features in one slice
            self._touched[key] += [values[start:stop].long() for start, stop in ranges]
        if parts or masked:
            output.register_hook(lambda grad: self._on_grad(grad, parts, targets, masked))

    @torch.no_grad()
    def _on_grad(self, grad: torch.Tensor, parts: dict, targets: dict[int, MaskedShard],
                 masked: list[tuple[torch.Tensor, slice, MaskedShard]]) -> torch.Tensor:
        """Records growth from the full gradient, then returns it with the single-id lookups'
        pruned positions zeroed (the gradient the fused optimizer applies)."""
        for key, pieces in parts.items():
            ids = concat([p[0] for p in pieces])
            grads = concat([_sample_gradients(grad, bags, columns, w)
                          for _, bags, columns, w in pieces])
            rows, row_grad = sum_by_row(ids, grads)
            growth = targets[key].growth
            growth.index_add_(0, rows, row_grad.abs_().to(growth.dtype))
        if not masked:
            return grad
        grad = grad.clone()
        for ids, columns, shard in masked:
            grad[:, columns] *= shard.keep_rows(ids)
        return grad

    @torch.no_grad()
    def after_backward(self) -> None:
        """Adds the data-parallel shards' gradient (DDP's mean, times the world size: the same
        sum over ranks that the sharded tables receive)."""
        if self.capturing:
            for s in self.replicated:
                gradient = s.shard.gradient()
                if gradient is not None:
                    s.growth += (gradient.abs() * self.world_size).to(s.growth.dtype)

    def take_touched_rows(self, shard: MaskedShard) -> torch.Tensor:
        """Local rows of `shard` that need re-masking: looked up since the last call in bags
        whose gradient could not be masked (with repeats: re-masking a row twice costs less
        than sorting the ids)."""
        ids = self._touched.pop(id(shard), [])
        return concat(ids) if ids else torch.empty(0, dtype=torch.int64)


def _extend(ranges: list[list[int]], start: int, stop: int) -> None:
    """Adds [start, stop) to `ranges`, joining it to the last range if they touch."""
    if ranges and ranges[-1][1] == start:
        ranges[-1][1] = stop
    else:
        ranges.append([start, stop])


def _sample_gradients(grad: torch.Tensor, bags: torch.Tensor | None, columns: slice,
                      weights: torch.Tensor | None) -> torch.Tensor:
    """The gradient reaching each looked-up id: its bag's pooled gradient (times its weight)."""
    sampled = grad[:, columns] if bags is None else grad[bags, columns]
    return sampled if weights is None else sampled * weights[:, None]

