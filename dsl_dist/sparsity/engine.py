"""The drop-and-grow engine every sparse-training method of this package is a case of.

In the style of RigL's `SparseOptimizer` base: at every update step of the schedule, for each
budget group, the controller plans how many units move, the method selects the active units
to drop and the inactive ones to grow (exact over the cluster), moves them (new masks or
layouts, optimizer state reset, dropped values zeroed, grown ones initialised) and the engine
records the outcome (`UpdateRecord`), checked by the controller against the budget. The engine
also owns what every method keeps alike: the budget, the rule for when gradients are captured,
the cluster-wide count and digest of the active units, and the checkpoint components.

A method supplies its unit of selection (a weight, a block of b weights: `unit`), its local
units and state (`shards`), and its selection and move (`drop_and_grow`, `move`), which hold
its scores: unstructured/weights.py does it for single weights (its methods, such as dsl.py,
supply only their scores), block/dsl.py for blocks of embedding rows.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import torch
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharding_spec import ShardMetadata

from dsl_dist.config import DropAndGrowConfig, GradientGrowthConfig
from dsl_dist.distributed import DistContext
from dsl_dist.sparsity.base import Controller, SparsityMethod
from dsl_dist.sparsity.budget import Group
from dsl_dist.sparsity.record import UpdateRecord

if TYPE_CHECKING:
    from dsl_dist.checkpoint import CheckpointStore


def sharded_state(pieces: Iterable[tuple[torch.Tensor, Sequence[int]]], shape: Sequence[int],
                  ctx: DistContext) -> ShardedTensor:
    """A checkpoint tensor of global `shape` made of this rank's (tensor, global offsets)
    pieces (empty ones left out), which DCP saves per rank and reshards on load."""
    local = [Shard(tensor, ShardMetadata(list(offsets), list(tensor.shape),
                                         f"rank:{ctx.rank}/{ctx.device}"))
             for tensor, offsets in pieces if tensor.numel()]
    return ShardedTensor._init_from_local_shards(local, list(shape), process_group=ctx.group)


class DropAndGrow(SparsityMethod):
    """Drop-and-grow of `unit`-weight units over this rank's `shards` of the tables ranked in
    `groups` (`table_units`: each sparsified table's units); `controller` plans the updates."""

    def __init__(self, cfg: DropAndGrowConfig, shards: Sequence[Any], groups: list[Group],
                 table_units: dict[str, int], unit: int, ctx: DistContext, seed: int,
                 controller: Controller) -> None:
        self.cfg, self.shards, self.groups, self.table_units = cfg, shards, groups, table_units
        self.unit, self.ctx, self.seed, self.controller = unit, ctx, seed, controller

    @property
    def budget(self) -> int:
        """Active weights over the cluster."""
        return sum(g.budget for g in self.groups) * self.unit

    def _members(self, group: Group) -> list[Any]:
        return [s for s in self.shards if s.table in group.tables]

    # what a method supplies

    def drop_and_grow(self, group: Group, k: int, step: int) -> tuple[Any, Any]:
        """The group's units to drop and to grow on this rank (k of each over the cluster, or
        fewer where fewer can move), chosen alike on every rank and world size."""
        raise NotImplementedError

    def move(self, group: Group, dropped: Any, grown: Any, step: int) -> torch.Tensor:
        """Applies the choice of `drop_and_grow`; returns this rank's (dropped, grown,
        regrown) unit counts."""
        raise NotImplementedError

    def capture_gradients(self, capturing: bool) -> None:
        """Whether the coming step records the growth statistic."""

    def clear_statistics(self) -> None:
        """Restarts the growth statistic after an update."""

    def local_active(self) -> Iterator[tuple[str, Any, Any]]:
        """(table, active units, digest of their positions) of the parts this rank counts
        (each unit on exactly one rank)."""
        raise NotImplementedError

    def state_tensors(self, shard: Any) -> tuple[torch.Tensor, ...]:
        """The sparsity state a shard keeps (its memory)."""
        raise NotImplementedError

    def checkpoint_components(self) -> dict[str, Any]:
        """What checkpoints keep of the method (`state_dict`/`load_state_dict` objects, all
        sharded), in loading order."""
        raise NotImplementedError

    def needs_gradients(self, step: int) -> bool:
        """Whether step `step` records gradients: for a method that grows by gradient, an
        accumulated statistic's every `growth_every`-th step and every update step (the last
        batch's); never for the others."""
        cfg = self.cfg
        return isinstance(cfg, GradientGrowthConfig) and (
            (cfg.growth == "accumulated" and step % cfg.growth_every == 0)
            or self.controller.schedule.is_update_step(step))

    def after_step(self, step: int) -> None:
        """What every step needs after the optimizer's updates (nothing here)."""

    # the engine

    def before_step(self, step: int) -> None:
        self.capture_gradients(self.needs_gradients(step))

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> Optional[UpdateRecord]:
        self.after_step(step)
        return self.update(step) if self.controller.schedule.is_update_step(step) else None

    @torch.no_grad()
    def update(self, step: int) -> UpdateRecord:
        """One drop-and-grow of every group, as the controller plans it."""
        started = time.perf_counter()
        plan = self.controller.plan(step)
        moved = torch.zeros(3, dtype=torch.int64)  # dropped, grown, regrown units (this rank)
        for group, k in zip(self.groups, plan):
            dropped, grown = self.drop_and_grow(group, k, step)
            moved += self.move(group, dropped, grown, step)
        self.clear_statistics()
        active, digest = self.active_per_table()
        dropped_total, grown_total, regrown = (int(x) for x in self.ctx.all_reduce_sum(moved))
        record = UpdateRecord(
            step=step, budget=self.budget, active=sum(active.values()),
            dropped=dropped_total * self.unit, grown=grown_total * self.unit,
            regrown=regrown * self.unit, fraction=self.controller.schedule.fraction(step),
            density={t: active[t] / (units * self.unit) for t, units in self.table_units.items()},
            mask_digest=digest, seconds=time.perf_counter() - started,
            blocks=None if self.unit == 1 else {"size": self.unit, "planned": sum(plan),
                                                "moved": grown_total})
        self.controller.record(record)
        return record

    def active_per_table(self) -> tuple[dict[str, int], str]:
        """Active weights of each sparsified table, summed over the cluster, and a digest of
        the whole mask: the sum of a 32-bit hash of every active position, the same for any
        world size and sharding (equal digests mean, barring collisions, equal masks)."""
        names = list(self.table_units)
        local = torch.zeros(len(names) + 1, dtype=torch.int64)
        for table, count, digest in self.local_active():
            local[names.index(table)] += count
            local[-1] += digest
        total = self.ctx.all_reduce_sum(local)
        return ({name: int(total[i]) * self.unit for i, name in enumerate(names)},
                f"{int(total[-1]):x}")

    def memory_bytes(self) -> int:
        """Bytes of sparsity state on this rank."""
        return sum(t.numel() * t.element_size() for s in self.shards
                   for t in self.state_tensors(s))

    def register_state(self, store: CheckpointStore) -> None:
        for name, component in self.checkpoint_components().items():
            store.register(name, component, sharded=True)
        store.register("controller", self.controller, sharded=False)
