"""The controller as a named Ray actor, for jobs on a Ray cluster.

The actor holds the only `SparsityController` of the job. Selection rounds rendezvous in it:
each rank sends its count vector for round n, the actor answers every rank with their sum once
all ranks have sent theirs. It is created with `num_cpus=0`, so it never takes a worker's slot,
and by the process that outlives the workers (the Ray launcher's driver, or rank 0 under
torchrun), since a Ray actor dies with the process that created it.

Every start of the worker group is a new session (a token from rank 0): a restarted group
after a failure resets the actor, whose rounds the dead workers may have left half full, and
then restores its history from the checkpoint it resumes from. If the actor itself dies, the
workers' calls fail, the group restarts, and rank 0 creates a new actor under the same name.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import ray
import torch

from dsl_dist.control.controller import SparsityController
from dsl_dist.sparsity.schedule import UpdateSchedule


class _Round:
    """The counts of one selection round, while ranks are still sending theirs."""

    def __init__(self) -> None:
        self.total: Optional[np.ndarray] = None
        self.arrived = 0
        self.answered = 0
        self.complete = asyncio.Event()


@ray.remote(num_cpus=0)
class ControllerActor:
    """The job's controller (async actor: ranks wait in `reduce` without blocking it)."""

    def __init__(self) -> None:
        self.controller: Optional[SparsityController] = None
        self.session = ""
        self.world_size = 0
        self.rounds: dict[int, _Round] = {}

    async def configure(self, session: str, schedule: dict[str, Any], budgets: list[int],
                        world_size: int) -> None:
        """Called by every rank of a session with the same values: the first call of a new
        session resets the actor, later ones must agree."""
        controller = SparsityController(UpdateSchedule(**schedule), budgets)
        if session != self.session:
            self.session, self.controller, self.world_size = session, controller, world_size
            self.rounds = {}
        elif (self.controller.schedule, self.controller.budgets, self.world_size) != (
                controller.schedule, controller.budgets, world_size):
            raise ValueError("ranks configured the controller differently: "
                             f"{controller.state_dict()} vs {self.controller.state_dict()}")

    def _configured(self) -> SparsityController:
        if self.controller is None:
            raise RuntimeError("controller actor used before configure()")
        return self.controller

    async def plan(self, step: int) -> list[int]:
        return self._configured().plan(step)

    async def reduce(self, session: str, round_id: int, counts: np.ndarray) -> np.ndarray:
        if session != self.session:
            raise RuntimeError(f"session {session} is over: the worker group was restarted")
        entry = self.rounds.setdefault(round_id, _Round())
        entry.total = counts.copy() if entry.total is None else entry.total + counts
        entry.arrived += 1
        if entry.arrived == self.world_size:
            entry.complete.set()
        await entry.complete.wait()
        entry.answered += 1
        if entry.answered == self.world_size:
            del self.rounds[round_id]
        return entry.total

    async def record(self, update: dict[str, Any]) -> None:
        self._configured().record(update)

    async def state_dict(self) -> dict[str, Any]:
        return self._configured().state_dict()

    async def load_state_dict(self, state: dict[str, Any]) -> None:
        self._configured().load_state_dict(state)


def controller_actor(name: str, namespace: Optional[str] = None) -> ray.actor.ActorHandle:
    """The named controller actor, created if it does not exist yet."""
    return ControllerActor.options(name=name, namespace=namespace,  # type: ignore[attr-defined]
                                   get_if_exists=True).remote()


class RayController:
    """A rank's client of the controller actor (same interface as `CollectiveController`)."""

    def __init__(self, actor: ray.actor.ActorHandle, session: str, schedule: UpdateSchedule,
                 budgets: list[int], world_size: int) -> None:
        self.actor, self.session, self.schedule = actor, session, schedule
        self._next_round = 0
        ray.get(actor.configure.remote(session, asdict(schedule), list(budgets), world_size))

    def plan(self, step: int) -> list[int]:
        return ray.get(self.actor.plan.remote(step))

    def reduce_counts(self, counts: torch.Tensor) -> torch.Tensor:
        round_id, self._next_round = self._next_round, self._next_round + 1
        total = ray.get(self.actor.reduce.remote(self.session, round_id, counts.cpu().numpy()))
        return torch.tensor(total, device=counts.device)  # a copy: Ray's large arrays are read-only

    def record(self, update: dict[str, Any]) -> None:
        ray.get(self.actor.record.remote(update))

    def state_dict(self) -> dict[str, Any]:
        return ray.get(self.actor.state_dict.remote())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ray.get(self.actor.load_state_dict.remote(state))

