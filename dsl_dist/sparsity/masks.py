"""A sparsity mask per local shard, addressed by global positions.

The global position of weight (row r, column c) of table t is base(t) + r·cols(t) + c, with the
tables in name order, so the same weight has the same position — and the same mask bit —
whatever the sharding type and world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dsl_dist.model.shards import WeightBlock
from dsl_dist.sparsity.fastops import multiply_rows_

POSITION_SCRAMBLE = 0x9E3779B97F4A7C15 - (1 << 64)
"""splitmix64's golden-ratio constant as a signed int64. Odd, so multiplying by it permutes
[0, 2**bits): tie-breaks and mask digests use it to scramble global positions."""
_MIX_1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX_2 = 0x94D049BB133111EB - (1 << 64)


def uniform_hash(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """A float32 in [0, 1) per position, a pure function of (seed, position) (splitmix64)."""
    seed_term = (seed * _MIX_2 + (1 << 63)) % (1 << 64) - (1 << 63)  # wrapped to int64
    x = positions * POSITION_SCRAMBLE + seed_term
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX_1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX_2
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 40) & 0xFFFFFF).to(torch.float32) / float(1 << 24)


@dataclass
class MaskedShard:
    """A table shard with its mask and the state drop-and-grow keeps about it."""

    shard: WeightBlock
    base: int
    """Global position of the table's first weight."""
    mask: torch.Tensor = field(init=False)
    """bool (num_rows, num_cols): True = active."""
    ever_dropped: torch.Tensor = field(init=False)
    """bool: dropped by some earlier update (to count weights that come back)."""
    growth: torch.Tensor = field(init=False)
    """float32: the growth statistic (|gradient|, see GrowthRecorder)."""

    STATE: ClassVar[tuple[str, ...]] = ("mask", "ever_dropped", "growth")
    """The fields a checkpoint keeps."""

    def __post_init__(self) -> None:
        shape, device = self.shard.weight.shape, self.shard.weight.device
        self.mask = torch.zeros(shape, dtype=torch.bool, device=device)
        self.ever_dropped = torch.zeros(shape, dtype=torch.bool, device=device)
        self.growth = torch.zeros(shape, dtype=torch.float32, device=device)

    @property
    def table(self) -> str:
        return self.shard.table

    def positions(self) -> torch.Tensor:
        """int64 (num_rows, num_cols) global positions of this shard's weights."""
        s = self.shard
        device = s.weight.device
        rows = torch.arange(s.row_offset, s.row_offset + s.num_rows, device=device)
        cols = torch.arange(s.col_offset, s.col_offset + s.num_cols, device=device)
        return self.base + rows[:, None] * s.table_cols + cols[None, :]

    def positions_at(self, flat: torch.Tensor) -> torch.Tensor:
        """Global positions of the weights at flat (row-major) local indices `flat`."""
        s = self.shard
        if s.num_cols == s.table_cols:  # whole rows: the shard is one contiguous range
            return flat + (self.base + s.row_offset * s.table_cols)
        rows = torch.div(flat, s.num_cols, rounding_mode="floor")
        return (self.base + s.col_offset + (rows + s.row_offset) * s.table_cols
                + (flat - rows * s.num_cols))

    @torch.no_grad()
    def apply_(self, rows: torch.Tensor | None = None) -> None:
        """Zeroes the pruned weights, of `rows` only (local indices, repeats allowed) or of the
        whole shard."""
        weight = self.shard.weight
        if rows is None or 2 * rows.numel() >= len(weight):  # one pass over all rows is cheaper
            weight.mul_(self.keep)
        elif rows.numel():
            # multiplying by the mask's bytes is twice as fast as masked_fill_ or where
            multiply_rows_(weight, self.keep, rows)

    @property
    def keep(self) -> torch.Tensor:
        """The mask as 0/1 bytes (a view), the fastest factor to zero pruned weights with."""
        return self.mask.view(torch.uint8)
