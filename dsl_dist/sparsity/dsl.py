"""Dynamic Sparse Learning on the local shards of a sharded model, with an exact cluster-wide
budget.

Every rank holds the masks of its own shards. Initial masks and every drop-and-grow are chosen
by `select_extreme` over the candidates of all ranks, whose rounds of counts are all-reduced
over the training process group, so the choice is exact, deterministic and independent of the
world size and of where the controller lives. The controller (dsl_dist/control) only says how
many weights each update moves and keeps the outcome. Data-parallel tables are replicated:
rank 0 alone offers their candidates and broadcasts the result.

The criteria are the paper's: drop the active weights of smallest |w|, grow the inactive
weights of largest growth statistic (|gradient|, see growth.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharding_spec import ShardMetadata
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

from dsl_dist.config import ConfigError, SparsityConfig
from dsl_dist.distributed import DistContext
from dsl_dist.model.shards import DenseBlock, WeightBlock, dense_blocks, local_table_shards
from dsl_dist.sparsity.base import Controller, SparsityMethod, SparsitySetup
from dsl_dist.sparsity.budget import Group, budget_groups, position_bases
from dsl_dist.sparsity.fastops import any_per_row, flat_nonzero
from dsl_dist.sparsity.growth import GrowthRecorder
from dsl_dist.sparsity.masks import POSITION_SCRAMBLE, MaskedShard, uniform_hash
from dsl_dist.sparsity.selection import Part, select_across

_DIGEST_BITS = 32

if TYPE_CHECKING:
    from dsl_dist.checkpoint import CheckpointStore


def table_shapes(tables: list[BaseEmbeddingConfig],
                 dense: Sequence[DenseBlock]) -> dict[str, tuple[int, int]]:
    """(rows, cols) of every table and dense block, by name, in name order: the order of the
    global positions (see masks.py), sparsified or not."""
    shapes = {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
    shapes.update({b.table: (b.num_rows, b.num_cols) for b in dense})
    return dict(sorted(shapes.items()))


def sparsified_tables(cfg: SparsityConfig, tables: list[BaseEmbeddingConfig],
                      dense: Sequence[DenseBlock]) -> list[str]:
    """The tables `sparsity.tables` names (all if empty; one the model lacks is refused) and
    the dense blocks, in name order."""
    names = [t.name for t in tables]
    unknown = sorted(set(cfg.tables) - set(names))
    if unknown:
        raise ConfigError(f"sparsity.tables={cfg.tables!r}: no table(s) {unknown}; the model "
                          f"has {sorted(names)}")
    return sorted([*(cfg.tables or names), *(b.table for b in dense)])


def build(setup: SparsitySetup) -> DynamicSparseTraining:
    """DSL over the sparsified tables and dense parameters of `setup.model`."""
    cfg = setup.cfg
    dense = dense_blocks(setup.model, cfg.dense_parameters, setup.dense_optimizer)
    shapes = table_shapes(setup.tables, dense)
    names = sparsified_tables(cfg, setup.tables, dense)
    groups = budget_groups(cfg, {n: shapes[n][0] * shapes[n][1] for n in names})
    controller = setup.connect([g.budget for g in groups], 1)
    blocks = [s for s in [*local_table_shards(setup.model), *dense] if s.table in names]
    return DynamicSparseTraining(cfg, blocks, shapes, groups, setup.ctx, setup.seed, controller)


class DynamicSparseTraining(SparsityMethod):
    """Masks and drop-and-grow for this rank's `blocks` (table shards and dense parameters) of
    the tables ranked in `groups`, positioned among all tables in `shapes`; `controller`
    plans the updates."""

    def __init__(self, cfg: SparsityConfig, blocks: Sequence[WeightBlock],
                 shapes: dict[str, tuple[int, int]], groups: list[Group], ctx: DistContext,
                 seed: int, controller: Controller) -> None:
        sizes = {name: rows * cols for name, (rows, cols) in shapes.items()}
        bases = position_bases(sizes)
        names = sorted(n for g in groups for n in g.tables)
        self.cfg, self.ctx, self.seed, self.controller = cfg, ctx, seed, controller
        self.groups = groups
        self.table_sizes = {n: sizes[n] for n in names}
        self.table_shapes = {n: shapes[n] for n in names}
        self.position_bits = max(1, sum(sizes.values()).bit_length())
        self.shards = [MaskedShard(b, bases[b.table]) for b in blocks]
        self.recorder = GrowthRecorder(self.shards, ctx.world_size,
                                       mask_gradients=(cfg.mask_gradients and
                                                       cfg.reset_optimizer_state))
        self._init_masks()

    @property
    def budget(self) -> int:
        return sum(g.budget for g in self.groups)

    def _offers(self, shard: MaskedShard) -> bool:
        """Whether this rank offers the shard's candidates (replicated ones: rank 0 only)."""
        return not shard.shard.replicated or self.ctx.is_main

    def _select(self, group: Group, k: int, *, largest: bool, scores: Any,
                candidates: Optional[Any] = None) -> dict[int, torch.Tensor]:
        """Per shard of `group`, which of its weights are among the k extreme scores of the
        candidates (every weight if `candidates` is None)."""
        members = [s for s in self.shards if s.table in group.tables]
        offered = [s for s in members if self._offers(s)]
        parts = [Part(scores(s), None if candidates is None else candidates(s), s.positions_at)
                 for s in offered]
        chosen = select_across(parts, k, largest=largest, reduce_counts=self.ctx.all_reduce_sum,
                               position_bits=self.position_bits)
        result = {id(s): c for s, c in zip(offered, chosen)}
        for s in members:
            if s.shard.replicated:
                result[id(s)] = self.ctx.broadcast_tensor(
                    result.get(id(s), torch.zeros_like(s.mask)).clone())
        return result

    @torch.no_grad()
    def _init_masks(self) -> None:
        """Exactly `budget` active weights per group, at the positions of smallest hash."""
        for group in self.groups:
            chosen = self._select(group, group.budget, largest=False,
                                  scores=lambda s: uniform_hash(s.positions(), self.seed))
            for s in self.shards:
                if s.table in group.tables:
                    s.mask.copy_(chosen[id(s)])
                    s.apply_()

    def before_step(self, step: int) -> None:
        """Called before training step `step` (counted from 1): record gradients if the
        growth signal needs this step."""
        self.recorder.capturing = (
            (self.cfg.growth == "accumulated" and step % self.cfg.growth_every == 0)
            or self.controller.schedule.is_update_step(step))

    def after_backward(self) -> None:
        self.recorder.after_backward()

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> Optional[dict[str, Any]]:
        """Re-zeroes pruned weights of the rows this step updated; at update steps runs
        drop-and-grow and returns its record."""
        for s in self.shards:
            s.apply_(None if s.shard.replicated else self.recorder.take_touched_rows(s))
        return self.update(step) if self.controller.schedule.is_update_step(step) else None

    @torch.no_grad()
    def update(self, step: int) -> dict[str, Any]:
        started = time.perf_counter()
        moved = torch.zeros(3, dtype=torch.int64)  # dropped, grown, regrown (this rank)
        for group, k in zip(self.groups, self.controller.plan(step)):
            dropped = self._select(group, k, largest=False,
                                   scores=lambda s: s.shard.weight.abs(),
                                   candidates=lambda s: s.mask)
            grown = self._select(group, k, largest=True, scores=lambda s: s.growth,
                                 candidates=lambda s: ~(s.mask & ~dropped[id(s)]))
            for s in self.shards:
                if s.table not in group.tables:
                    continue
                drop, grow = dropped[id(s)], grown[id(s)]
                new_mask = (s.mask & ~drop) | grow
                if self._offers(s):  # count_nonzero: bool sum() is ~20x slower
                    regrown = grow & (s.ever_dropped | drop)
                    moved += torch.tensor([int(torch.count_nonzero(drop)),
                                           int(torch.count_nonzero(grow)),
                                           int(torch.count_nonzero(regrown))])
                if self.cfg.reset_optimizer_state:
                    self._reset_optimizer_state(s, new_mask)
                s.ever_dropped |= drop
                s.mask.copy_(new_mask)
                s.apply_()
        for s in self.shards:
            s.growth.zero_()
        active, digest = self.active_per_table()
        dropped_total, grown_total, regrown = (int(x) for x in self.ctx.all_reduce_sum(moved))
        record = {"step": step, "budget": self.budget, "active": sum(active.values()),
                  "dropped": dropped_total, "grown": grown_total, "regrown": regrown,
                  "fraction": self.controller.schedule.fraction(step),
                  "density": {t: active[t] / self.table_sizes[t] for t in self.table_sizes},
                  "mask_digest": digest, "seconds": time.perf_counter() - started}
        self.controller.record(record)
        return record

    @staticmethod
    def _reset_optimizer_state(shard: MaskedShard, new_mask: torch.Tensor) -> None:
        """Zeroes per-weight optimizer state where the mask changes; per-row state (row-wise
        Adagrad) only for rows that had no active weight before, since it is shared with the
        row's other, unchanged weights."""
        unchanged = (new_mask == shard.mask).view(torch.uint8)  # x * 0/1 beats masked_fill_
        revived_rows = ~any_per_row(shard.mask) & any_per_row(new_mask)
        for state in shard.shard.optimizer_states():
            if state.numel() == unchanged.numel():
                state.view_as(unchanged).mul_(unchanged)
            elif state.numel() == unchanged.shape[0]:
                state.view(-1).mul_((~revived_rows).view(torch.uint8))

    def active_per_table(self) -> tuple[dict[str, int], str]:
        """Active weights of each sparsified table, summed over the cluster, and a digest of
        the whole mask: the sum of a 32-bit hash of every active position, the same for any
        world size and sharding (equal digests mean, barring collisions, equal masks)."""
        names = list(self.table_sizes)
        local = torch.zeros(len(names) + 1, dtype=torch.int64)
        for s in self.shards:
            if self._offers(s):
                active = s.positions_at(flat_nonzero(s.mask))
                local[names.index(s.table)] += active.numel()
                hashes = (active * POSITION_SCRAMBLE) >> (64 - _DIGEST_BITS)
                local[-1] += int((hashes & ((1 << _DIGEST_BITS) - 1)).sum())
        total = self.ctx.all_reduce_sum(local)
        return {name: int(total[i]) for i, name in enumerate(names)}, f"{int(total[-1]):x}"

    def state_dict(self) -> dict[str, Any]:
        """Masks, drop history and growth statistics: one tensor per table and kind, sharded
        like the table (a ShardedTensor of this rank's shards at their global offsets; the
        full tensor for replicated tables), so that DCP saves each rank's part and reshards on
        load. Its tensors are the live state: loading into them restores it in place."""
        state: dict[str, Any] = {}
        for table, shape in self.table_shapes.items():
            shards = [s for s in self.shards if s.table == table]
            for kind in MaskedShard.STATE:
                if shards and shards[0].shard.replicated:
                    state[f"{table}.{kind}"] = getattr(shards[0], kind)
                    continue
                local = [Shard(getattr(s, kind), ShardMetadata(
                    [s.shard.row_offset, s.shard.col_offset], [s.shard.num_rows, s.shard.num_cols],
                    f"rank:{self.ctx.rank}/{self.ctx.device}")) for s in shards]
                state[f"{table}.{kind}"] = ShardedTensor._init_from_local_shards(
                    local, list(shape), process_group=self.ctx.group)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-zeroes pruned weights: DCP has loaded `state` into the live tensors that
        `state_dict()` returned (after the model's weights)."""
        for s in self.shards:
            s.apply_()

    def register_state(self, store: CheckpointStore) -> None:
        store.register("sparsity", self, sharded=True)
        store.register("controller", self.controller, sharded=False)
