"""Checkpoints of block pools that do not depend on the world size.

A pool's physical layout does (each rank packs its own rows' blocks into its own slots), so
checkpoints keep a canonical form instead, as two components loaded one after the other:

- `LayoutState` ("sparsity"): per virtual row, its width, growth statistics and high-water
  mark, as tensors of the table's rows sharded like the rows are;
- `BlockValues` ("sparsity_blocks"): every active block, in row order, with its fused optimizer
  state: a (active blocks × b) tensor per table, each rank's part at the offset of its first
  row's blocks. Those offsets come from the widths, so this component's tensors are built only
  once the layout is in place (after it, on load).

DCP reshards both for any world size; the rank that owns a row after loading finds its blocks at
its rows' offsets and packs them into its slots.
"""

from __future__ import annotations

from typing import Any

import torch

from dsl_dist.config import ConfigError
from dsl_dist.distributed import DistContext
from dsl_dist.sparsity.block.pool import PoolGeometry
from dsl_dist.sparsity.block.shard import PoolShard
from dsl_dist.sparsity.engine import sharded_state


class LayoutState:
    """Which blocks every row holds, and its growth statistics."""

    def __init__(self, shards: list[PoolShard], geometries: dict[str, PoolGeometry],
                 ctx: DistContext) -> None:
        self.shards, self.geometries, self.ctx = shards, geometries, ctx

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for table, geometry in self.geometries.items():
            mine = [s for s in self.shards if s.table == table]
            for kind in PoolShard.STATE:
                state[f"{table}.{kind}"] = sharded_state(
                    [(getattr(s, kind), [s.first_row]) for s in mine], [geometry.num_rows],
                    self.ctx)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The widths were loaded in place: lay the rows out again (their blocks follow)."""
        for s in self.shards:
            s.rowptr = torch.zeros(s.num_rows + 1, dtype=torch.int32, device=s.device)
            torch.cumsum(s.widths.to(torch.int32), 0, out=s.rowptr[1:])
            if s.active_blocks > s.capacity:
                raise ConfigError(f"sparsity.block.headroom: too small for table {s.table}: the "
                                  f"checkpoint's {s.active_blocks} blocks of rows "
                                  f"[{s.first_row}, {s.end_row}) exceed this shard's "
                                  f"{s.capacity} slots; raise it")


class BlockValues:
    """The active blocks and their optimizer state, in row order."""

    def __init__(self, shards: list[PoolShard], geometries: dict[str, PoolGeometry],
                 ctx: DistContext) -> None:
        self.shards, self.geometries, self.ctx = shards, geometries, ctx

    def _layout(self) -> dict[str, tuple[int, list[int], dict[int, int]]]:
        """Per table with active blocks: their number over the cluster, the columns of each
        per-slot tensor (weights, then optimizer state), and where each shard (by its first
        row) starts among them."""
        shards = [entry for rank in self.ctx.all_gather_object(
            [(s.table, s.first_row, s.active_blocks, [t.shape[1] for t in s.tensors()])
             for s in self.shards]) for entry in rank]
        layout = {}
        for table in self.geometries:
            mine = sorted(entry[1:] for entry in shards if entry[0] == table)
            total = sum(active for _, active, _ in mine)
            if total:
                starts = dict(zip([first for first, _, _ in mine],
                                  [sum(a for _, a, _ in mine[:i]) for i in range(len(mine))]))
                layout[table] = (total, mine[0][2], starts)
        return layout

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for table, (total, columns, starts) in self._layout().items():
            mine = [s for s in self.shards if s.table == table]
            for index, width in enumerate(columns):
                state[f"{table}.{index}"] = sharded_state(
                    [(s.tensors()[index][:s.active_blocks], [starts[s.first_row], 0])
                     for s in mine], [total, width], self.ctx)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Slots past the active blocks hold nothing: zero them, so that the layout is the
        same as that of a run that never stopped (the zero slot keeps what the model's and
        optimizer's own components restored: what its lookups left there)."""
        for s in self.shards:
            for tensor in s.tensors():
                tensor[s.active_blocks:s.capacity] = 0
