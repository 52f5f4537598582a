"""When drop-and-grow happens, and what fraction of the active weights it moves."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from dsl_dist.config import DropAndGrowConfig, check_schedule, is_int, require

# ζ·active is a product of floats: 0.07 * 100 == 7.000000000000001. Values within this relative
# distance above an integer count as that integer, so the rounding up does not depend on noise.
_ROUNDING_SLACK = 1e-12


@dataclass(frozen=True)
class UpdateSchedule:
    """When drop-and-grow happens and what fraction of active weights it moves.

    Cosine-decayed update fraction, as in DSL's reference code and RigL:
    ζ(t) = ζ_min + (ζ_0 − ζ_min)·(1 + cos(π t / T))/2 with T = total_steps, so ζ(0) = ζ_0 and
    ζ(T) = ζ_min.

    Steps are counted from 1 and an update at step t happens after that step's optimizer step.
    Updates happen at the steps t with t % delta_t == 0 and t <= t_end (RigL's freeze point;
    None means total_steps), but never at t = total_steps or later: nothing would train the
    weights grown at the last step, so updating there would only lose trained weights.

    Invalid fields raise `ConfigError` (a ValueError) naming the field as `sparsity.<field>`
    (the checks `DropAndGrowConfig.validate` makes, see `check_schedule`).
    """

    delta_t: int
    total_steps: int
    zeta_0: float = 0.5
    zeta_min: float = 0.005
    t_end: Optional[int] = None

    def __post_init__(self) -> None:
        require(is_int(self.total_steps) and self.total_steps >= 1, "sparsity.total_steps",
                 "must be an integer >= 1", self.total_steps)
        check_schedule(self.delta_t, self.zeta_0, self.zeta_min, self.t_end, self.total_steps,
                       "total_steps")

    @classmethod
    def of(cls, cfg: DropAndGrowConfig, total_steps: int) -> "UpdateSchedule":
        """The schedule a run of `total_steps` steps follows under `cfg`."""
        return cls(cfg.delta_t, total_steps, cfg.zeta_0, cfg.zeta_min, cfg.t_end)

    @property
    def last_update_step(self) -> int:
        """The last step that may be an update step: min(t_end, total_steps - 1)."""
        end = self.total_steps if self.t_end is None else self.t_end
        return min(end, self.total_steps - 1)

    def fraction(self, step: int) -> float:
        """ζ(step); steps beyond total_steps get ζ_min (the cosine is not continued)."""
        if step < 0:
            raise ValueError(f"UpdateSchedule.fraction: step={step} is negative")
        cosine = (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps)) / 2
        return self.zeta_min + (self.zeta_0 - self.zeta_min) * cosine

    def is_update_step(self, step: int) -> bool:
        """Whether drop-and-grow runs after step `step` (counted from 1)."""
        return 0 < step <= self.last_update_step and step % self.delta_t == 0

    def num_to_move(self, step: int, active: int) -> int:
        """k = ceil(ζ(step)·active), the reference code's per-tensor count, never more than
        `active` (products within 1e-12 relative above an integer round down to it)."""
        if active < 0:
            raise ValueError(f"UpdateSchedule.num_to_move: active={active} is negative")
        product = self.fraction(step) * active
        return min(active, math.ceil(product * (1 - _ROUNDING_SLACK)))
