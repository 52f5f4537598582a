"""What one drop-and-grow did: the record a method returns, the controller checks and keeps,
and the run writes as an `update` line of metrics.jsonl (report/plots.py reads it back)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional


@dataclass(frozen=True)
class UpdateRecord:
    """One update, counted in weights over the whole cluster."""

    step: int
    budget: int
    """Active weights the method must keep."""
    active: int
    """Active weights after the update."""
    dropped: int
    grown: int
    regrown: int
    """Grown weights that some earlier (or this) update had dropped."""
    fraction: float
    """ζ(t): the fraction of the budget the schedule let this update move."""
    density: dict[str, float]
    """Active / all weights of each sparsified table."""
    mask_digest: str
    """A hash of every active position, the same for any world size and sharding."""
    seconds: float
    blocks: Optional[dict[str, int]] = None
    """Methods that move blocks of weights: the block size, and the blocks planned and moved
    (fewer when too few rows can move)."""

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON fields (without `blocks` for methods that move single weights)."""
        record = asdict(self)
        if self.blocks is None:
            del record["blocks"]
        return record

    @classmethod
    def from_dict(cls, line: dict[str, Any]) -> UpdateRecord:
        """The record of an `update` line (its other fields, such as memory figures, left)."""
        return cls(**{f.name: line[f.name] for f in fields(cls) if f.name in line})
