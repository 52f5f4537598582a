"""The cluster-wide side of sparse training: budget, schedule, selection rounds and history.

Workers never decide alone what moves. At an update they ask the controller how many weights
each group moves (`plan`), exchange the counts of every selection round through it
(`reduce_counts`: per-rank histograms in, their sum out, from which every rank takes the same
threshold decision) and report the outcome (`record`). Only count vectors cross to the
controller: O(ranks × rounds × 65536) integers per update, never a weight or a gradient.

One interface, two transports: `CollectiveController` below (torch.distributed; every rank
holds an identical replica, so torchrun needs no other service) and `RayController`
(dsl_dist/control/ray_controller.py; a named Ray actor holds the only copy). Integer sums are
exact, so both give bit-identical masks.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dsl_dist.sparsity.schedule import UpdateSchedule


class SparsityController:
    """The controller's state and decisions, whatever carries them: small and serialisable."""

    def __init__(self, schedule: UpdateSchedule, budgets: list[int]) -> None:
        self.schedule = schedule
        self.budgets = list(budgets)
        """Active weights of each group of tables ranked together."""
        self.history: list[dict[str, Any]] = []
        """One record per drop-and-grow, as written to metrics.jsonl."""

    def plan(self, step: int) -> list[int]:
        """How many weights each group drops (and grows) at update step `step`."""
        if not self.schedule.is_update_step(step):
            raise ValueError(f"step {step} is not an update step of {self.schedule}")
        return [self.schedule.num_to_move(step, budget) for budget in self.budgets]

    def record(self, update: dict[str, Any]) -> None:
        if update["active"] != sum(self.budgets):
            raise RuntimeError(f"update at step {update['step']}: {update['active']} active "
                               f"weights, budget {sum(self.budgets)}")
        self.history.append(update)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": asdict(self.schedule), "budgets": list(self.budgets),
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes the saved history; the budgets must be the same, the schedule is this run's
        (its total steps follow the world size when a run resumes on another one)."""
        if state["budgets"] != self.budgets:
            raise ValueError(f"controller state has budgets {state['budgets']}, this run "
                             f"{self.budgets}")
        self.history = list(state["history"])


class Controller(Protocol):
    """What the workers of a job see of the controller (every method is called by every
    rank in the same order, except `record`, called by rank 0)."""

    schedule: UpdateSchedule

    def plan(self, step: int) -> list[int]: ...

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor: ...

    def record(self, update: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CollectiveController(SparsityController):
    """The controller as a replica on every rank, its rounds reduced with all_reduce: every
    rank takes the decision rank 0 would take from the same sums, without a broadcast."""

    def __init__(self, schedule: UpdateSchedule, budgets: list[int],
                 group: dist.ProcessGroup) -> None:
        super().__init__(schedule, budgets)
        self.group = group

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        out = counts.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out
