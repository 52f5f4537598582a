"""The cluster-wide side of sparse training: budget, schedule, plan and history.

This is the control plane. At an update every rank asks the controller how many weights each
budget group moves (`plan`), the ranks then select them together over the training process group
(the data plane: count histograms all-reduced, see dsl_dist/sparsity/selection/exact.py, so
nothing of it grows with the world size here), and every rank reports the outcome (`record`),
which the controller checks against the budget and keeps in its history.

One `SparsityController`, two homes: a replica on every rank (`collective`: torchrun needs no
other service, and replicas agree because plans are a pure function of the schedule and every
rank records the same outcome), or a named Ray actor holding the only copy
(dsl_dist/control/ray_controller.py), which outlives the workers and keeps a Ray job's history.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dsl_dist.sparsity.record import UpdateRecord
from dsl_dist.sparsity.schedule import UpdateSchedule


class SparsityController:
    """The controller's state and decisions, whatever carries them: small and serialisable."""

    def __init__(self, schedule: UpdateSchedule, budgets: list[int], unit: int = 1) -> None:
        self.schedule = schedule
        self.budgets = list(budgets)
        """Active units of each group of tables ranked together."""
        self.unit = unit
        """Weights per unit: 1, or the block size of structured DSL."""
        self.history: list[dict[str, Any]] = []
        """One record per drop-and-grow, as written to metrics.jsonl (`UpdateRecord.as_dict`:
        plain data for checkpoints); it also tells which update steps have run, so that none
        runs twice."""

    def plan(self, step: int) -> list[int]:
        """How many units each group drops (and grows) at update step `step`."""
        if not self.schedule.is_update_step(step):
            raise ValueError(f"step {step} is not an update step of {self.schedule}")
        if self.history and step <= self.history[-1]["step"]:
            raise RuntimeError(f"update at step {step} planned again: the controller's "
                               f"history already ends at step {self.history[-1]['step']}")
        return [self.schedule.num_to_move(step, budget) for budget in self.budgets]

    def record(self, update: UpdateRecord) -> None:
        if update.active != sum(self.budgets) * self.unit:
            raise RuntimeError(f"update at step {update.step}: {update.active} active "
                               f"weights, budget {sum(self.budgets) * self.unit}")
        self.history.append(update.as_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": asdict(self.schedule), "budgets": list(self.budgets),
                "unit": self.unit, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes the saved history; the budgets must be the same, the schedule is this run's
        (its total steps follow the world size when a run resumes on another one)."""
        if (state["budgets"], state.get("unit", 1)) != (self.budgets, self.unit):
            raise ValueError(f"controller state has budgets {state['budgets']} of "
                             f"{state.get('unit', 1)} weight(s), this run {self.budgets} of "
                             f"{self.unit}")
        self.history = list(state["history"])
