"""The best evaluation of a run by a validation metric: which epoch a user should keep.

Chosen on the selection split (`eval.select_split`, e.g. valid) so that the reported split
(`eval.split`, test) never influences the choice; the test figures of the chosen epoch are the
run's honest result. A checkpoint component, so that a resumed run remembers its best.
"""

from __future__ import annotations

from typing import Any, Optional


class BestEvaluation:
    """The evaluation with the highest `metric` on the selection split so far."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.best: Optional[dict[str, Any]] = None

    def offer(self, epoch: int, step: int, selection: dict[str, float],
              reported: dict[str, float]) -> bool:
        """Records an evaluation; whether it is the new best (ties keep the earlier one)."""
        if self.best is not None and selection[self.metric] <= self.best["selection"][self.metric]:
            return False
        self.best = {"epoch": epoch, "step": step, "selection": dict(selection),
                     "reported": dict(reported)}
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"] if state["metric"] == self.metric else None
