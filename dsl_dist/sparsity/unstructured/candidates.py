"""A selection's candidates over a rank's masked shards, a chunk of rows at a time.

The entries of the shards a rank offers are numbered one shard after the other, row-major, and
visited in chunks of about `elements` weights, so that a selection over 10^8 weights a rank
holds only a chunk's scores, keys and masks at a time (streaming.py).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from dsl_dist.sparsity.selection.hashing import POSITION_SCRAMBLE
from dsl_dist.sparsity.selection.streaming import Chunk
from dsl_dist.sparsity.unstructured.masks import MaskedShard

Entries = Callable[[MaskedShard, slice], tuple[torch.Tensor, Optional[torch.Tensor]]]
"""(scores (rows, cols), packed candidates (rows, ceil(cols / 8)) or None) of a chunk of a
shard's rows (see streaming.Chunk)."""


class ShardCandidates:
    """The candidates `entries` gives over `shards` (the ones this rank offers), scored by
    the absolute value of what it gives if `absolute`."""

    def __init__(self, shards: list[MaskedShard], entries: Entries, elements: int,
                 position_bits: int, absolute: bool = False) -> None:
        self.shards, self.entries, self.elements = shards, entries, elements
        self.position_bits, self.absolute = position_bits, absolute
        sizes = [s.num_rows * s.num_cols for s in shards]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def chunk(self, index: int, rows: slice) -> Chunk:
        """The chunk of rows `rows` of the `index`-th shard."""
        shard = self.shards[index]
        scores, candidates = self.entries(shard, rows)
        return Chunk(self.starts[index] + rows.start * shard.num_cols, scores, candidates,
                     self.absolute, shard.position_layout(rows))

    def shard_chunks(self) -> Iterator[tuple[int, slice]]:
        for index, shard in enumerate(self.shards):
            for rows in shard.row_chunks(self.elements):
                yield index, rows

    def chunks(self) -> Iterator[Chunk]:
        return (self.chunk(index, rows) for index, rows in self.shard_chunks())

    def tie_keys(self, flat: torch.Tensor) -> torch.Tensor:
        """A fixed permutation of the global positions of the entries at ascending `flat`."""
        ends = torch.tensor(self.starts[1:], dtype=torch.int64, device=flat.device)
        cuts = [0, *torch.searchsorted(flat, ends).tolist()]
        keys = torch.cat([flat.new_empty(0)] + [
            s.positions_at(flat[a:b] - start)
            for s, a, b, start in zip(self.shards, cuts, cuts[1:], self.starts)])
        return keys.mul_(POSITION_SCRAMBLE).bitwise_and_((1 << self.position_bits) - 1)
