"""The cosine update schedule: fraction, update steps, rounding, validation."""

from __future__ import annotations

import math

import pytest

from dsl_dist.config import ConfigError
from dsl_dist.sparsity.schedule import UpdateSchedule


def test_cosine_fraction_at_start_middle_and_end() -> None:
    s = UpdateSchedule(delta_t=10, total_steps=1000, zeta_0=0.5, zeta_min=0.005)
    assert s.fraction(0) == pytest.approx(0.5)
    assert s.fraction(500) == pytest.approx((0.5 + 0.005) / 2)
    assert s.fraction(1000) == pytest.approx(0.005)
    assert s.fraction(250) == pytest.approx(0.005 + 0.495 * (1 + math.cos(math.pi / 4)) / 2)
    assert s.fraction(750) == pytest.approx(0.005 + 0.495 * (1 + math.cos(3 * math.pi / 4)) / 2)
    # decreasing over the run, and not continued past T
    values = [s.fraction(t) for t in range(0, 1001, 50)]
    assert values == sorted(values, reverse=True)
    assert s.fraction(1500) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="step=-1"):
        s.fraction(-1)


def test_defaults_are_dsl_reference_values() -> None:
    s = UpdateSchedule(delta_t=1, total_steps=10)
    assert (s.zeta_0, s.zeta_min, s.t_end) == (0.5, 0.005, None)


def test_update_steps_without_t_end_skip_step_zero_and_the_last_step() -> None:
    s = UpdateSchedule(delta_t=10, total_steps=50)
    assert [t for t in range(0, 70) if s.is_update_step(t)] == [10, 20, 30, 40]
    s = UpdateSchedule(delta_t=10, total_steps=51)
    assert [t for t in range(0, 70) if s.is_update_step(t)] == [10, 20, 30, 40, 50]
    s = UpdateSchedule(delta_t=1, total_steps=4)
    assert [t for t in range(-2, 8) if s.is_update_step(t)] == [1, 2, 3]
    assert s.last_update_step == 3


def test_update_steps_with_t_end() -> None:
    frozen = UpdateSchedule(delta_t=10, total_steps=50, t_end=25)
    assert [t for t in range(0, 70) if frozen.is_update_step(t)] == [10, 20]
    at_boundary = UpdateSchedule(delta_t=10, total_steps=50, t_end=30)
    assert [t for t in range(0, 70) if at_boundary.is_update_step(t)] == [10, 20, 30]
    # t_end == total_steps still leaves the last step alone
    whole = UpdateSchedule(delta_t=10, total_steps=50, t_end=50)
    assert [t for t in range(0, 70) if whole.is_update_step(t)] == [10, 20, 30, 40]
    assert UpdateSchedule(delta_t=1, total_steps=5, t_end=1).last_update_step == 1


def test_num_to_move_rounds_up_and_is_capped() -> None:
    constant = lambda zeta: UpdateSchedule(delta_t=1, total_steps=10, zeta_0=zeta,  # noqa: E731
                                           zeta_min=zeta)
    assert constant(1.0).num_to_move(3, 7) == 7
    assert constant(0.3).num_to_move(3, 10) == 3
    assert constant(0.3).num_to_move(3, 11) == 4  # 3.3 -> 4
    assert constant(0.3).num_to_move(3, 1) == 1  # 0.3 -> 1
    assert constant(0.3).num_to_move(3, 0) == 0
    assert constant(0.07).num_to_move(0, 100) == 7  # 0.07 * 100 == 7.000000000000001
    assert constant(0.001).num_to_move(0, 1_000_001) == 1001  # 1000.001 -> 1001
    s = UpdateSchedule(delta_t=10, total_steps=1000, zeta_0=0.5, zeta_min=0.005)
    assert s.num_to_move(0, 1001) == 501  # 500.5 -> 501
    assert s.num_to_move(500, 1000) == math.ceil(s.fraction(500) * 1000) == 253  # 252.5
    assert s.num_to_move(1000, 1000) == 5
    with pytest.raises(ValueError, match="active=-1"):
        s.num_to_move(10, -1)


@pytest.mark.parametrize("kwargs, key", [
    ({"delta_t": 0}, "delta_t"),
    ({"delta_t": 2.5}, "delta_t"),
    ({"total_steps": 0}, "total_steps"),
    ({"zeta_0": 0.0}, "zeta_0"),
    ({"zeta_0": 1.5}, "zeta_0"),
    ({"zeta_0": float("nan")}, "zeta_0"),
    ({"zeta_min": 0.9}, "zeta_min"),
    ({"zeta_min": -0.1}, "zeta_min"),
    ({"t_end": 0}, "t_end"),
    ({"t_end": 101}, "t_end"),
])
def test_validation_names_the_field(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^sparsity\.{key}=") as error:
        UpdateSchedule(**({"delta_t": 5, "total_steps": 100} | kwargs))
    assert isinstance(error.value, ConfigError)


def test_valid_edge_values_are_accepted() -> None:
    UpdateSchedule(delta_t=1, total_steps=1, zeta_0=1.0, zeta_min=1.0, t_end=1)
    UpdateSchedule(delta_t=100, total_steps=100, zeta_0=0.5, zeta_min=0.0, t_end=100)
