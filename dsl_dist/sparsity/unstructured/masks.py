"""A sparsity mask per local shard, addressed by global positions.

The global position of weight (row r, column c) of table t is base(t) + r·cols(t) + c, with the
tables in name order, so the same weight has the same position — and the same mask bit —
whatever the sharding type and world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch

from dsl_dist.model.shards import WeightBlock
from dsl_dist.sparsity.selection import chunk_kernels
from dsl_dist.sparsity.selection.fastops import host_path, multiply_rows_, unpack_bits
from dsl_dist.sparsity.selection.hashing import position_digest

@dataclass
class MaskedShard:
    """A table shard with its mask and the state drop-and-grow keeps about it: the mask and the
    drop history at one bit per weight, the growth statistic in `growth_dtype` (bfloat16 by
    default: 2.25 bytes a weight in all, against the weights' 4)."""

    shard: WeightBlock
    base: int
    """Global position of the table's first weight."""
    growth_dtype: torch.dtype = torch.bfloat16
    bits: torch.Tensor = field(init=False)
    """uint8 (num_rows, ceil(num_cols / 8)): the mask, 8 columns a byte (fastops.pack_bits)."""
    dropped_bits: torch.Tensor = field(init=False)
    """The same for `ever dropped by some update` (to count weights that come back)."""
    growth: torch.Tensor = field(init=False)
    """(num_rows, num_cols): the growth statistic (|gradient|, see GrowthRecorder)."""

    STATE: ClassVar[tuple[str, ...]] = ("mask", "ever_dropped", "growth")
    """The fields a checkpoint keeps (masks as bool tensors, see DynamicSparseTraining)."""

    def __post_init__(self) -> None:
        shape, device = self.shard.weight.shape, self.shard.weight.device
        packed = (shape[0], (shape[1] + 7) // 8)
        self.bits = torch.zeros(packed, dtype=torch.uint8, device=device)
        self.dropped_bits = torch.zeros(packed, dtype=torch.uint8, device=device)
        self.growth = torch.zeros(shape, dtype=self.growth_dtype, device=device)

    @property
    def table(self) -> str:
        return self.shard.table

    @property
    def num_rows(self) -> int:
        return self.shard.num_rows

    @property
    def num_cols(self) -> int:
        return self.shard.num_cols

    def mask_of(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """bool mask of `rows` (a slice or local row indices)."""
        return unpack_bits(self.bits[rows], self.num_cols)

    def dropped_of(self, rows: slice) -> torch.Tensor:
        return unpack_bits(self.dropped_bits[rows], self.num_cols)

    @property
    def mask(self) -> torch.Tensor:
        """The whole mask as a new bool tensor (for inspection; the code works on chunks)."""
        return self.mask_of(slice(None))

    def row_chunks(self, elements: int) -> Iterator[slice]:
        """Slices of consecutive rows of about `elements` weights each."""
        step = max(1, elements // max(self.num_cols, 1))
        return (slice(a, min(a + step, self.num_rows)) for a in range(0, self.num_rows, step))

    def position_layout(self, rows: slice) -> tuple[int, int]:
        """(first, stride): the weight at (row, col) of `rows` is at global position
        first + row * stride + col."""
        s = self.shard
        start = rows.indices(s.num_rows)[0]
        return self.base + s.col_offset + (s.row_offset + start) * s.table_cols, s.table_cols

    def positions(self, rows: slice = slice(None)) -> torch.Tensor:
        """int64 (rows, num_cols) global positions of the weights of `rows`."""
        first, stride = self.position_layout(rows)
        device = self.shard.weight.device
        start, stop, _ = rows.indices(self.num_rows)
        return (first + torch.arange(stop - start, device=device)[:, None] * stride
                + torch.arange(self.num_cols, device=device)[None, :])

    def positions_at(self, flat: torch.Tensor) -> torch.Tensor:
        """Global positions of the weights at flat (row-major) local indices `flat`."""
        first, stride = self.position_layout(slice(None))
        if self.num_cols == stride:  # whole rows: the shard is one contiguous range
            return flat + first
        rows = torch.div(flat, self.num_cols, rounding_mode="floor")
        return first + rows * stride + (flat - rows * self.num_cols)

    def active_digest(self, rows: slice) -> tuple[int, int]:
        """The active weights of `rows` and the sum of a 32-bit hash of each one's global
        position (the top bits of position * POSITION_SCRAMBLE): a mask digest's share."""
        if host_path(self.bits):
            return chunk_kernels.count_and_digest(self.bits[rows].numpy(), self.num_cols,
                                                  *self.position_layout(rows))
        active = self.positions(rows)[self.mask_of(rows)]
        return active.numel(), position_digest(active)

    def keep_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The mask of local rows `rows` as 0/1 bytes, the fastest factor to zero pruned weights
        with (multiplying beats masked_fill_ and where)."""
        return self.mask_of(rows).view(torch.uint8)

    @torch.no_grad()
    def apply_(self, rows: torch.Tensor | None = None, elements: int = 1 << 22) -> None:
        """Zeroes the pruned weights, of `rows` only (local indices, repeats allowed) or of the
        whole shard (`elements` weights at a time)."""
        weight = self.shard.weight
        if rows is None or 2 * rows.numel() >= len(weight):  # one pass over all rows is cheaper
            for chunk in self.row_chunks(elements):
                weight[chunk].mul_(self.mask_of(chunk).view(torch.uint8))
        elif rows.numel():
            multiply_rows_(weight, rows, self.keep_rows(rows))
