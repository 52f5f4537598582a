"""Dynamic Sparse Learning on the local shards of a sharded model, with an exact cluster-wide
budget.

Every rank holds the masks of its own shards. Initial masks and every drop-and-grow are chosen
by `select_extreme` over the candidates of all ranks, whose rounds of counts go through the
job's controller (dsl_dist/control), so the choice is exact, deterministic and independent of
the world size and of the controller's transport. Data-parallel tables are replicated: rank 0
alone offers their candidates and broadcasts the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharding_spec import ShardMetadata
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

from dsl_dist.config import ConfigError, SparsityConfig
from dsl_dist.control.controller import CollectiveController, Controller
from dsl_dist.distributed import DistContext
from dsl_dist.model.shards import DenseBlock, local_table_shards
from dsl_dist.sparsity.fastops import any_per_row, flat_nonzero
from dsl_dist.sparsity.growth import GrowthRecorder, concat
from dsl_dist.sparsity.masks import MaskedShard, uniform_hash
from dsl_dist.sparsity.schedule import UpdateSchedule
from dsl_dist.sparsity.selection import select_extreme

_TIE_SCRAMBLE = 0x9E3779B97F4A7C15 - (1 << 64)  # odd: multiplying by it permutes [0, 2**bits)
_DIGEST_BITS = 32

ConnectController = Callable[[UpdateSchedule, list[int]], Controller]
"""Builds this rank's controller from the schedule and the budget of every group."""


class MagnitudeGradientScoring:
    """DSL's scores: drop the active weights of smallest |w|, grow the inactive weights of
    largest growth statistic (|gradient|). Subclass to change the criteria."""

    def drop_scores(self, shard: MaskedShard) -> torch.Tensor:
        return shard.shard.weight.abs()

    def grow_scores(self, shard: MaskedShard) -> torch.Tensor:
        return shard.growth


@dataclass(frozen=True)
class Group:
    """Tables whose weights are ranked together, and their fixed number of active weights."""

    tables: tuple[str, ...]
    budget: int


class DynamicSparseTraining:
    """Masks, schedule and drop-and-grow for the embedding tables of one sharded model, and
    the dense parameters in `dense` (each treated as a table of its own name)."""

    def __init__(self, cfg: SparsityConfig, model: nn.Module, tables: list[BaseEmbeddingConfig],
                 ctx: DistContext, total_steps: int, seed: int,
                 dense: Sequence[DenseBlock] = (),
                 scoring: Optional[MagnitudeGradientScoring] = None,
                 connect: Optional[ConnectController] = None) -> None:
        shapes = {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
        unknown = sorted(set(cfg.tables) - set(shapes))
        if unknown:
            raise ConfigError(f"sparsity.tables={cfg.tables!r}: no table(s) {unknown}; the model "
                              f"has {sorted(shapes)}")
        shapes.update({b.table: (b.num_rows, b.num_cols) for b in dense})
        sizes = {name: rows * cols for name, (rows, cols) in shapes.items()}
        names = sorted([*(cfg.tables or [t.name for t in tables]), *(b.table for b in dense)])
        bases = dict(zip(sorted(sizes), [sum(sizes[n] for n in sorted(sizes)[:i])
                                         for i in range(len(sizes))]))
        self.cfg, self.ctx, self.seed = cfg, ctx, seed
        self.table_sizes = {n: sizes[n] for n in names}
        self.table_shapes = {n: shapes[n] for n in names}
        self.position_bits = max(1, sum(sizes.values()).bit_length())
        self.scoring = scoring or MagnitudeGradientScoring()
        self.shards = [MaskedShard(s, bases[s.table]) for s in [*local_table_shards(model), *dense]
                       if s.table in names]
        groups = [tuple(names)] if cfg.scope == "global" else [(n,) for n in names]
        self.groups = [Group(g, round(cfg.density * sum(sizes[n] for n in g))) for g in groups]
        for group in self.groups:
            if group.budget < 1:
                raise ConfigError(f"sparsity.density={cfg.density}: leaves no active weight in "
                                  f"table(s) {list(group.tables)}")
        self.schedule = UpdateSchedule(cfg.delta_t, total_steps, cfg.zeta_0, cfg.zeta_min,
                                       cfg.t_end)
        connect = connect or (lambda schedule, budgets: CollectiveController(schedule, budgets,
                                                                             ctx.group))
        self.controller = connect(self.schedule, [g.budget for g in self.groups])
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
        device = self.ctx.device
        flat_scores = concat([scores(s).reshape(-1) for s in offered]
                             or [torch.empty(0, device=device)])
        flat_candidates = None if candidates is None else concat(
            [candidates(s).reshape(-1) for s in offered]
            or [torch.empty(0, dtype=torch.bool, device=device)])
        ends = torch.tensor([s.mask.numel() for s in offered], dtype=torch.int64).cumsum(0)

        def tie_keys(tied: torch.Tensor) -> torch.Tensor:
            """Tie-break keys of the weights at `tied` (ascending indices into flat_scores):
            a fixed permutation of their global positions, computed only for the candidates
            tied at the threshold."""
            cuts = [0, *torch.searchsorted(tied, ends.to(device)).tolist()]
            starts = [0, *ends.tolist()]
            keys = torch.cat([s.positions_at(tied[a:b] - start) for s, a, b, start
                              in zip(offered, cuts, cuts[1:], starts)] or [tied.new_empty(0)])
            return keys.mul_(_TIE_SCRAMBLE).bitwise_and_((1 << self.position_bits) - 1)

        chosen = select_extreme(flat_scores, tie_keys, k, largest=largest,
                                reduce_counts=self.controller.reduce_counts,
                                position_bits=self.position_bits, candidates=flat_candidates)
        result = {id(s): chosen[start:end].view_as(s.mask)
                  for s, start, end in zip(offered, [0, *ends.tolist()], ends.tolist())}
        for s in members:
            if s.shard.replicated:
                picked = result.get(id(s), torch.zeros_like(s.mask)).to(torch.uint8)
                dist.broadcast(picked, src=0, group=self.ctx.group)
                result[id(s)] = picked.bool()
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
            or self.schedule.is_update_step(step))

    def after_backward(self) -> None:
        self.recorder.after_backward()

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> Optional[dict[str, Any]]:
        """Re-zeroes pruned weights of the rows this step updated; at update steps runs
        drop-and-grow and returns its record."""
        for s in self.shards:
            s.apply_(None if s.shard.replicated else self.recorder.take_touched_rows(s))
        return self.update(step) if self.schedule.is_update_step(step) else None

    @torch.no_grad()
    def update(self, step: int) -> dict[str, Any]:
        started = time.perf_counter()
        moved = torch.zeros(3, dtype=torch.int64)  # dropped, grown, regrown (this rank)
        for group, k in zip(self.groups, self.controller.plan(step)):
            dropped = self._select(group, k, largest=False, scores=self.scoring.drop_scores,
                                   candidates=lambda s: s.mask)
            grown = self._select(group, k, largest=True, scores=self.scoring.grow_scores,
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
        dropped_total, grown_total, regrown = (int(x) for x in
                                               self.controller.reduce_counts(moved))
        record = {"step": step, "budget": self.budget, "active": sum(active.values()),
                  "dropped": dropped_total, "grown": grown_total, "regrown": regrown,
                  "fraction": self.schedule.fraction(step),
                  "density": {t: active[t] / self.table_sizes[t] for t in self.table_sizes},
                  "mask_digest": digest, "seconds": time.perf_counter() - started}
        if self.ctx.is_main:
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
                hashes = (active * _TIE_SCRAMBLE) >> (64 - _DIGEST_BITS)
                local[-1] += int((hashes & ((1 << _DIGEST_BITS) - 1)).sum())
        total = self.controller.reduce_counts(local)
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
    def after_load(self) -> None:
        """Re-zeroes pruned weights after the tensors of `state_dict()` were loaded."""
        for s in self.shards:
            s.apply_()
