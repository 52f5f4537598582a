"""The controller as a named Ray actor, for jobs on a Ray cluster.

The actor holds the only `SparsityController` of the job; the ranks call it for the plan of
each update and rank 0 reports the outcome. It is created with `num_cpus=0`, so it never takes
a worker's slot, and by the process that outlives the workers (the Ray launcher's driver, or
rank 0 under torchrun), since a Ray actor dies with the process that created it.

Every start of the worker group is a new session (a token from rank 0): a restarted group
after a failure resets the actor and then restores its history from the checkpoint it resumes
from. If the actor itself dies, the workers' next call fails, the group restarts, and rank 0
creates a new actor under the same name.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

import ray

from dsl_dist.control.controller import SparsityController
from dsl_dist.sparsity.record import UpdateRecord
from dsl_dist.sparsity.schedule import UpdateSchedule


@ray.remote(num_cpus=0)
class ControllerActor:
    """The job's controller."""

    def __init__(self) -> None:
        self.controller: Optional[SparsityController] = None
        self.session = ""
        self.world_size = 0

    def configure(self, session: str, schedule: dict[str, Any], budgets: list[int], unit: int,
                  world_size: int) -> None:
        """Called by every rank of a session with the same values: the first call of a new
        session resets the actor, later ones must agree."""
        controller = SparsityController(UpdateSchedule(**schedule), budgets, unit)
        if session != self.session:
            self.session, self.controller, self.world_size = session, controller, world_size
        elif (self.controller.schedule, self.controller.budgets, self.controller.unit,
              self.world_size) != (controller.schedule, controller.budgets, unit, world_size):
            raise ValueError("ranks configured the controller differently: "
                             f"{controller.state_dict()} vs {self.controller.state_dict()}")

    def _configured(self, session: str) -> SparsityController:
        if session != self.session:
            raise RuntimeError(f"session {session} is over: the worker group was restarted")
        if self.controller is None:
            raise RuntimeError("controller actor used before configure()")
        return self.controller

    def plan(self, session: str, step: int) -> list[int]:
        return self._configured(session).plan(step)

    def record(self, session: str, update: UpdateRecord) -> None:
        self._configured(session).record(update)

    def state_dict(self, session: str) -> dict[str, Any]:
        return self._configured(session).state_dict()

    def load_state_dict(self, session: str, state: dict[str, Any]) -> None:
        self._configured(session).load_state_dict(state)


def controller_actor(name: str, namespace: Optional[str] = None) -> ray.actor.ActorHandle:
    """The named controller actor, created if it does not exist yet."""
    return ControllerActor.options(name=name, namespace=namespace,  # type: ignore[attr-defined]
                                   get_if_exists=True).remote()


class RayController:
    """A rank's client of the controller actor (the interface of `SparsityController`)."""

    def __init__(self, actor: ray.actor.ActorHandle, session: str, schedule: UpdateSchedule,
                 budgets: list[int], unit: int, world_size: int, is_main: bool) -> None:
        self.actor, self.session, self.schedule, self.is_main = actor, session, schedule, is_main
        ray.get(actor.configure.remote(session, asdict(schedule), list(budgets), unit,
                                       world_size))

    def plan(self, step: int) -> list[int]:
        return ray.get(self.actor.plan.remote(self.session, step))

    def record(self, update: UpdateRecord) -> None:
        """Every rank reports the same outcome; rank 0's report is the one the actor keeps."""
        if self.is_main:
            ray.get(self.actor.record.remote(self.session, update))

    def state_dict(self) -> dict[str, Any]:
        return ray.get(self.actor.state_dict.remote(self.session))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.is_main:
            ray.get(self.actor.load_state_dict.remote(self.session, state))
