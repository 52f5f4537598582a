"""Structured DSL: drop-and-grow over blocks of embedding rows, stored in pools sized to the budget.

The sparsified tables are block pools (pool.py): a row's active blocks are its first
`width` blocks of b dimensions (nested, as in mixed-dimension embeddings, so a user and an item
share min(width) aligned dimensions), and only those occupy memory. The budget is B blocks
(B·b weights) per group, exact on the whole cluster after every update. Every `delta_t` steps,
k = ceil(ζ(t)·B) blocks move (at most one per row, so k is capped by the rows that can):

- drop: the last blocks of smallest L2 norm, among rows above `sparsity.block.min_blocks`;
- grow: the next blocks of largest growth statistic (|gradient| summed over the block since the
  last update, or over the update step's batch with `growth=last_batch`); a row that was just
  dropped competes with its dropped block, which then keeps its value (as a dropped weight
  does in weight-level DSL). Grown blocks start at zero with zero optimizer state.

Choices use the same exact distributed selection as weight-level DSL, over rows, with global
block positions as tie-breaks, so 1 and 2 ranks choose alike; plan, record, budget and
checkpoint components are the drop-and-grow engine's (engine.py), with a block as the unit. A shard cannot hold more blocks
than its slots: where growth would overflow one, its best candidates up to its free slots
compete (and k shrinks if too few remain anywhere), a bound `sparsity.block.headroom` sets.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import nn

from dsl_dist.config import BlockDSLConfig, ConfigError
from dsl_dist.distributed import DistContext
from dsl_dist.model.shards import initial_rows, local_table_shards
from dsl_dist.model.torchrec_internals import embedding_kernels
from dsl_dist.sparsity.base import Controller, SparsitySetup
from dsl_dist.sparsity.block.hooks import PoolKernelHooks
from dsl_dist.sparsity.block.pool import PoolGeometry, block_collections, pool_collections
from dsl_dist.sparsity.block.shard import PoolShard
from dsl_dist.sparsity.block.state import BlockValues, LayoutState
from dsl_dist.sparsity.budget import Group, budget_groups, position_bases
from dsl_dist.sparsity.engine import DropAndGrow
from dsl_dist.sparsity.selection.exact import Part, local_counts, select_across, select_extreme
from dsl_dist.sparsity.selection.hashing import uniform_hash


def transform_model(cfg: BlockDSLConfig, model: nn.Module) -> nn.Module:
    """The plain model with its sparsified tables (all, or `sparsity.tables`) as block pools."""
    tables = {t.name: t for m in model.modules() if hasattr(m, "embedding_bag_configs")
              for t in m.embedding_bag_configs()}
    names = set(cfg.tables) or set(tables)
    unknown = sorted(names - set(tables))
    if unknown:
        raise ConfigError(f"sparsity.tables={list(cfg.tables)!r}: no table(s) {unknown}; the "
                          f"model has {sorted(tables)}")
    for name in sorted(names):
        if tables[name].embedding_dim % cfg.block.size:
            raise ConfigError(f"sparsity.block.size={cfg.block.size}: does not divide the "
                              f"{tables[name].embedding_dim} dimensions of table {name!r}")
    return pool_collections(model, names, cfg.block.size, cfg.density, cfg.block.headroom)


def build(setup: SparsitySetup) -> BlockDSL:
    cfg, model = setup.cfg, setup.model
    geometries = dict(sorted({name: g for c in block_collections(model)
                              for name, g in c.geometries.items()}.items()))
    blocks = {n: g.num_rows * g.blocks_per_row for n, g in geometries.items()}
    bases = position_bases(blocks)
    groups = budget_groups(cfg, blocks)
    shards = []
    for shard in local_table_shards(model):
        if shard.table not in geometries:
            continue
        if shard.replicated or shard.num_cols != cfg.block.size:
            raise ConfigError(f"model.sharding_type: table {shard.table!r} is sharded "
                              f"{'data-parallel' if shard.replicated else 'column-wise'}; "
                              "block_dsl pools shard table- or row-wise")
        shards.append(PoolShard(shard, geometries[shard.table], bases[shard.table]))
    controller = setup.connect([g.budget for g in groups], cfg.block.size)
    return BlockDSL(cfg, shards, geometries, groups, setup.ctx, setup.seed, setup.init_std,
                    controller, PoolKernelHooks(embedding_kernels(model), shards))


class BlockDSL(DropAndGrow):
    """Drop-and-grow of whole blocks over this rank's pool shards (see the module docstring)."""

    def __init__(self, cfg: BlockDSLConfig, shards: list[PoolShard],
                 geometries: dict[str, PoolGeometry], groups: list[Group],
                 ctx: DistContext, seed: int, init_std: float, controller: Controller,
                 hooks: PoolKernelHooks) -> None:
        super().__init__(cfg, shards, groups, {n: g.num_rows * g.blocks_per_row
                                               for n, g in geometries.items()},
                         cfg.block.size, ctx, seed, controller)
        self.geometries, self.hooks = geometries, hooks
        self.position_bits = max(1, sum(self.table_units.values()).bit_length())
        self._lay_out_initial(init_std)

    def _select(self, k: int, largest: bool, parts: list[Part]) -> list[torch.Tensor]:
        return select_across(parts, k, largest=largest, reduce_counts=self.ctx.all_reduce_sum,
                             position_bits=self.position_bits)

    @torch.no_grad()
    def _lay_out_initial(self, init_std: float) -> None:
        """Every row of a group gets ⌊d·J⌋ blocks (d the group's density, J its table's block
        positions); the rows of smallest hash of their position one more, to the exact
        budget. Active blocks take the initial values a dense table has there."""
        for group in self.groups:
            members = self._members(group)
            total = sum(self.table_units[n] for n in group.tables)
            base = {n: math.floor(group.budget * g.blocks_per_row / total)
                    for n, g in self.geometries.items() if n in group.tables}
            extra = group.budget - sum(base[n] * self.geometries[n].num_rows
                                       for n in group.tables)
            parts = [Part(uniform_hash(s.block_positions(torch.arange(s.num_rows,
                                                                      device=s.device), 0),
                                       self.seed),
                          torch.full((s.num_rows,), base[s.table] < s.geometry.blocks_per_row,
                                     device=s.device),
                          lambda rows, s=s: s.block_positions(rows, 0)) for s in members]
            chosen = self._select(extra, False, parts)
            for s, more in zip(members, chosen):
                s.set_widths((base[s.table] + more.to(torch.int64)).to(torch.uint8))
                s.high_water.copy_(s.widths)
                self._write_initial_values(s, init_std)

    def _write_initial_values(self, s: PoolShard, init_std: float) -> None:
        g = s.geometry
        for first, values in initial_rows(s.table, g.dim, s.first_row, s.end_row, init_std,
                                          self.seed):
            rows = torch.arange(first, first + len(values), device=s.device) - s.first_row
            blocks = values.to(s.device).view(len(values), g.blocks_per_row, g.block)
            active = (torch.arange(g.blocks_per_row, device=s.device)[None, :]
                      < s.widths[rows, None].long())
            row_index, block_index = torch.nonzero(active, as_tuple=True)
            s.shard.weight[s.slots(rows[row_index], block_index)] = blocks[row_index, block_index]

    def capture_gradients(self, capturing: bool) -> None:
        self.hooks.capturing = capturing

    def _drop_parts(self, members: list[PoolShard]) -> list[Part]:
        parts = []
        for s in members:
            widths = s.widths.to(torch.int32)
            parts.append(Part(s.last_block_norms(), widths > self.cfg.block.min_blocks,
                              lambda rows, s=s, w=widths: s.block_positions(rows, w[rows] - 1)))
        return parts

    def _grow_parts(self, members: list[PoolShard], dropped: list[torch.Tensor]) -> list[Part]:
        """Each row's next block after the drop (its dropped block, scored by its own
        statistic, if it was just dropped), at most as many per shard as it has free slots."""
        parts = []
        for s, drop in zip(members, dropped):
            after = s.widths.to(torch.int64) - drop.to(torch.int64)
            scores = torch.where(drop, s.grow_last, s.grow_next).float()
            candidates = after < s.geometry.blocks_per_row
            positions = (lambda rows, s=s, w=after: s.block_positions(rows, w[rows]))
            free = s.capacity - (s.active_blocks - int(drop.sum()))
            if int(candidates.sum()) > free:
                candidates = select_extreme(scores, positions, free, largest=True,
                                            reduce_counts=local_counts, candidates=candidates)
            parts.append(Part(scores, candidates, positions))
        return parts

    def drop_and_grow(self, group: Group, k: int, step: int
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The rows whose last block drops and those whose next block grows (k of each, fewer
        if fewer rows can), per member shard."""
        members = self._members(group)
        drop_parts = self._drop_parts(members)
        count = torch.tensor([int(p.candidates.sum()) for p in drop_parts] or [0]).sum()
        k = min(k, int(self.ctx.all_reduce_sum(count.reshape(1))))
        while True:
            dropped = self._select(k, False, drop_parts)
            grow_parts = self._grow_parts(members, dropped)
            available = int(self.ctx.all_reduce_sum(torch.tensor(
                [sum(int(p.candidates.sum()) for p in grow_parts)])))
            if available >= k:
                return dropped, self._select(k, True, grow_parts)
            k = available

    def move(self, group: Group, dropped: list[torch.Tensor], grown: list[torch.Tensor],
             step: int) -> torch.Tensor:
        """New widths: a dropped row loses its last block, a grown one gains its next."""
        moved = torch.zeros(3, dtype=torch.int64)  # dropped, grown, regrown blocks
        for s, drop, grow in zip(self._members(group), dropped, grown):
            widths = s.widths.to(torch.int16) - drop.to(torch.int16) + grow.to(torch.int16)
            regrown = grow & (widths - 1 < s.high_water.to(torch.int16))
            moved += torch.tensor([int(drop.sum()), int(grow.sum()), int(regrown.sum())])
            s.set_widths(widths.to(torch.uint8))
        return moved

    def clear_statistics(self) -> None:
        for s in self.shards:
            s.grow_next.zero_()
            s.grow_last.zero_()

    def local_active(self) -> Iterator[tuple[str, int, int]]:
        for s in self.shards:
            yield (s.table, *s.active_digest())

    def state_tensors(self, shard: PoolShard) -> tuple[torch.Tensor, ...]:
        """Per-row layouts and statistics (the pools are the tables themselves)."""
        return shard.widths, shard.rowptr, shard.grow_next, shard.grow_last, shard.high_water

    def checkpoint_components(self) -> dict[str, Any]:
        return {"sparsity": LayoutState(self.shards, self.geometries, self.ctx),
                "sparsity_blocks": BlockValues(self.shards, self.geometries, self.ctx)}
