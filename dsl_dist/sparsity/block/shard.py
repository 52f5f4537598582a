"""One rank's shard of a block pool: which blocks its virtual rows hold, and where.

The shard owns the virtual rows whose proxies fall in its pool rows (pool.py). Blocks are
nested: row r's active blocks are its first `widths[r]`, stored in consecutive slots from
`rowptr[r]`, rows in order (CSR), so that the whole layout is 5 bytes per owned row (a width and
an offset) and the slot of block j < widths[r] is rowptr[r] + j. An update changes each row's
width by at most one block; `set_widths` moves the kept blocks to the new layout in place,
weights and optimizer state alike, a bounded chunk of rows at a time.

The shard's last slot holds no block but zeros, looked up wherever a row's block is inactive
(hooks.py), so that the lookups of a step have the shapes of dense's.

The growth statistics are per row, in bfloat16: |gradient| summed over the block a row would
grow next (`grow_next`, block widths[r]) and over its last active block (`grow_last`), which
competes for regrowth when the update drops it (as a dropped weight does in weight-level DSL).
"""

from __future__ import annotations

from typing import Iterator

import torch

from dsl_dist.config import ConfigError
from dsl_dist.model.shards import TableShard
from dsl_dist.sparsity.block.pool import PROXY_SCALE, PoolGeometry
from dsl_dist.sparsity.selection.hashing import position_digest

RELOCATION_ROWS = 1 << 16
"""Rows a pass over the layout takes at once (`set_widths` moves their blocks; the update's
scores and digest gather theirs), so that its extra memory is theirs, not the shard's."""


class PoolShard:
    """Rows [first_row, end_row) of a pooled table and their blocks in this rank's slots."""

    STATE = ("widths", "grow_next", "grow_last", "high_water")
    """Per-row tensors a checkpoint keeps (with the blocks themselves)."""

    def __init__(self, shard: TableShard, geometry: PoolGeometry, block_base: int) -> None:
        self.shard, self.geometry, self.block_base = shard, geometry, block_base
        self.first_row = int(geometry.row_of(shard.row_offset))
        self.end_row = min(geometry.num_rows,
                           int(geometry.row_of(shard.row_offset + shard.num_rows)))
        rows = max(self.end_row - self.first_row, 0)
        device = self.device  # the layout lives with the blocks: the hooks index it by ids
        self.widths = torch.zeros(rows, dtype=torch.uint8, device=device)
        self.rowptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self.grow_next = torch.zeros(rows, dtype=torch.bfloat16, device=device)
        self.grow_last = torch.zeros(rows, dtype=torch.bfloat16, device=device)
        self.high_water = torch.zeros(rows, dtype=torch.uint8, device=device)
        """The widest each row has been: a block grown below it had been dropped before."""
        self._zero_index: torch.Tensor | None = None

    @property
    def table(self) -> str:
        return self.shard.table

    @property
    def device(self) -> torch.device:
        return self.shard.weight.device

    @property
    def num_rows(self) -> int:
        return len(self.widths)

    @property
    def capacity(self) -> int:
        """Slots that can hold blocks: all but the zero slot."""
        return self.shard.num_rows - 1

    def clear_zero_slot(self) -> None:
        """Zeroes the zero slot's weights (one op)."""
        if self._zero_index is None:
            self._zero_index = torch.tensor([self.zero_slot], device=self.device)
        self.shard.weight.index_fill_(0, self._zero_index, 0)

    @property
    def zero_slot(self) -> int:
        """The shard's last slot, never a block's: the hooks send the ids of inactive blocks
        there, so that every lookup keeps its shape (no data-dependent sizes in a step), and
        zero it before every lookup (the optimizer may have moved it)."""
        return self.shard.num_rows - 1

    @property
    def active_blocks(self) -> int:
        return int(self.rowptr[-1])

    def row_chunks(self) -> Iterator[slice]:
        return (slice(a, min(a + RELOCATION_ROWS, self.num_rows))
                for a in range(0, self.num_rows, RELOCATION_ROWS))

    def last_block_norms(self) -> torch.Tensor:
        """float32 per row: the L2 norm of its last active block (a row without one gets some
        block's: it is no drop candidate)."""
        norms = torch.zeros(self.num_rows, device=self.device)
        for rows in self.row_chunks():
            last = (self.rowptr[rows].to(torch.int64) + self.widths[rows] - 1).clamp(min=0)
            norms[rows] = self.shard.weight[last].float().norm(dim=1)
        return norms

    def active_digest(self) -> tuple[int, int]:
        """The shard's active blocks and the digest of their global positions."""
        count = digest = 0
        for rows in self.row_chunks():
            widths = self.widths[rows].to(torch.int64)
            owners = torch.repeat_interleave(
                torch.arange(rows.start, rows.stop, device=self.device), widths)
            blocks = _expand(torch.zeros_like(widths), widths)
            count += len(owners)
            digest += position_digest(self.block_positions(owners, blocks))
        return count, digest

    def block_positions(self, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Global positions of blocks (local rows, block index): the same for any sharding."""
        return self.block_base + (rows + self.first_row) * self.geometry.blocks_per_row + blocks

    def local_rows(self, proxies: torch.Tensor) -> torch.Tensor:
        """This shard's rows of the (local) pool-row ids its kernel receives:
        row_of(proxies + row_offset) - first_row, with the offsets folded into one constant
        (3 ops a lookup)."""
        g = self.geometry
        constant = self.shard.row_offset * PROXY_SCALE + g.factor - 1 - self.first_row * g.factor
        return (proxies * PROXY_SCALE + constant) // g.factor

    def slots(self, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Slots of active blocks (local rows, block index < their width)."""
        return self.rowptr[rows].to(torch.int64) + blocks

    def virtual_rows(self) -> torch.Tensor:
        """This shard's rows as the model sees them, (rows, D): their blocks, zeros beyond
        their widths."""
        g = self.geometry
        rows = torch.zeros(self.num_rows, g.blocks_per_row, g.block, dtype=self.shard.weight.dtype,
                           device=self.device)
        active = (torch.arange(g.blocks_per_row, device=self.device)[None, :]
                  < self.widths[:, None].long())
        row_index, block_index = torch.nonzero(active, as_tuple=True)
        rows[row_index, block_index] = self.shard.weight[self.slots(row_index, block_index)]
        return rows.view(self.num_rows, g.dim)

    def tensors(self) -> list[torch.Tensor]:
        """The per-slot tensors: weights and fused optimizer state, as (slots, columns)."""
        return [self.shard.weight, *(s.view(self.shard.num_rows, -1)
                                     for s in self.shard.optimizer_states())]

    @torch.no_grad()
    def set_widths(self, widths: torch.Tensor) -> None:
        """Gives every row a new width and moves the blocks it keeps to the new layout, in
        place; its new blocks, and every slot past the last block, are zeroed with their
        optimizer state. Refuses a layout beyond the shard's slots."""
        # per-row arrays in the layout's own dtypes (uint8 widths, int32 offsets); int64 only
        # a chunk of rows at a time
        widths = widths.to(self.widths.dtype)
        new_ptr = torch.zeros(self.num_rows + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(widths, 0, dtype=torch.int32, out=new_ptr[1:])
        if int(new_ptr[-1]) > self.capacity:
            raise ConfigError(f"sparsity.block.headroom: too small for table {self.table}: "
                              f"{int(new_ptr[-1])} active blocks exceed the {self.capacity} "
                              f"slots of its shard at row {self.first_row}; raise it")
        kept = torch.minimum(self.widths, widths)
        delta = new_ptr[:-1] - self.rowptr[:-1]
        tensors = self.tensors()
        for upwards in (False, True):  # down-movers from the bottom, then up-movers from the top
            rows = torch.nonzero(((delta > 0) if upwards else (delta < 0)) & (kept > 0)).flatten()
            for chunk in (rows.flip(0) if upwards else rows).split(RELOCATION_ROWS):
                counts = kept[chunk].to(torch.int64)
                source = _expand(self.rowptr[chunk].to(torch.int64), counts)
                target = source + torch.repeat_interleave(delta[chunk].to(torch.int64), counts)
                for tensor in tensors:
                    tensor.index_copy_(0, target, tensor.index_select(0, source))
        grown = torch.nonzero(widths > kept).flatten()
        for chunk in grown.split(RELOCATION_ROWS):
            fresh = _expand(new_ptr[chunk].to(torch.int64) + kept[chunk],
                            (widths[chunk] - kept[chunk]).to(torch.int64))
            for tensor in tensors:
                tensor.index_fill_(0, fresh, 0)
        for tensor in tensors:
            tensor[int(new_ptr[-1]):] = 0
        self.widths.copy_(widths)
        self.rowptr = new_ptr
        self.high_water = torch.maximum(self.high_water, self.widths)


def _expand(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[s, s + c) for every (s, c), one after another."""
    total = int(counts.sum())
    ends = torch.cumsum(counts, 0)
    return (torch.arange(total, dtype=torch.int64, device=starts.device)
            - torch.repeat_interleave(ends - counts, counts, output_size=total)
            + torch.repeat_interleave(starts, counts, output_size=total))
