"""The controller's own state: plans from the schedule, a history that refuses a broken
budget, and a state that only loads into a run with the same schedule and budgets."""

from __future__ import annotations

import sys
import types

import pytest

from dsl_dist.config import ControlConfig
from dsl_dist.control import controller_kind
from dsl_dist.control.controller import SparsityController
from dsl_dist.sparsity.record import UpdateRecord
from dsl_dist.sparsity.schedule import UpdateSchedule

SCHEDULE = UpdateSchedule(delta_t=10, total_steps=100)


def update(step: int, active: int) -> UpdateRecord:
    """A record of an update at `step` leaving `active` weights (its other figures made up)."""
    return UpdateRecord(step=step, budget=1000, active=active, dropped=5, grown=5, regrown=0,
                        fraction=0.1, density={"user": 0.5}, mask_digest="abc", seconds=0.0)


def test_plan_moves_the_cosine_fraction_of_each_group() -> None:
    controller = SparsityController(SCHEDULE, [1000, 30])
    assert controller.plan(10) == [SCHEDULE.num_to_move(10, 1000), SCHEDULE.num_to_move(10, 30)]
    assert controller.plan(10)[0] > controller.plan(90)[0] > 0
    with pytest.raises(ValueError, match="not an update step"):
        controller.plan(11)


def test_history_refuses_an_update_that_breaks_the_budget() -> None:
    controller = SparsityController(SCHEDULE, [1000, 30])
    controller.record(update(10, 1030))
    with pytest.raises(RuntimeError, match="1029 active weights, budget 1030"):
        controller.record(update(20, 1029))
    assert [u["step"] for u in controller.history] == [10]


def test_state_round_trips_and_refuses_another_budget() -> None:
    controller = SparsityController(SCHEDULE, [1000])
    controller.record(update(10, 1000))
    restored = SparsityController(SCHEDULE, [1000])
    restored.load_state_dict(controller.state_dict())
    assert restored.history == controller.history
    longer = SparsityController(UpdateSchedule(delta_t=10, total_steps=200), [1000])
    longer.load_state_dict(controller.state_dict())  # the same run on another world size
    assert longer.history == controller.history and longer.schedule.total_steps == 200
    with pytest.raises(ValueError, match="budgets"):
        SparsityController(SCHEDULE, [999]).load_state_dict(controller.state_dict())


def test_an_update_step_is_planned_once() -> None:
    """The history tells which updates ran: planning one of them again (a worker group that
    replays steps its controller already recorded) is refused."""
    controller = SparsityController(SCHEDULE, [1000])
    controller.plan(10)
    controller.record(update(10, 1000))
    with pytest.raises(RuntimeError, match="planned again"):
        controller.plan(10)
    assert controller.plan(20)


def test_auto_picks_the_collective_controller_without_importing_ray(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchrun job on a machine without ray (a GPU image) must not need it."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert controller_kind(ControlConfig()) == "collective"
    assert "ray" not in sys.modules
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert controller_kind(ControlConfig()) == "ray"
    assert "ray" not in sys.modules
    assert controller_kind(ControlConfig(controller="collective")) == "collective"


@pytest.mark.parametrize("connected", [True, False])
def test_auto_picks_ray_inside_a_ray_job(monkeypatch: pytest.MonkeyPatch,
                                         connected: bool) -> None:
    """A Ray worker has imported ray and is connected; a process that imported it without
    connecting is not a Ray job."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: connected))
    assert controller_kind(ControlConfig()) == ("ray" if connected else "collective")
