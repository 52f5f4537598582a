"""What a rank's memory holds: resident set size and its peaks by phase, bytes of tensors.

Peaks come from Linux's high-water mark of the resident set (VmHWM), which writing "5" to
/proc/self/clear_refs resets, so a phase (an epoch, an update, an evaluation) reports its own
peak. Phases nest: an update's peak counts in its epoch's. Elsewhere the peak is the process's
maximum so far (ru_maxrss) and phases do not reset it.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Iterable

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """The resident set size now."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """The resident set's high-water mark (since the last reset, where resets work)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakTracker:
    """Peak RSS of nested phases: `start()` a phase, `stop()` returns its peak."""

    def __init__(self) -> None:
        self._outer: list[float] = []  # the peak so far of each phase that is still open

    def start(self) -> None:
        if self._outer:
            self._outer[-1] = max(self._outer[-1], peak_rss_mb())
        self._outer.append(0.0)
        _reset_peak()

    def stop(self) -> float:
        peak = max(self._outer.pop(), peak_rss_mb())
        if self._outer:
            self._outer[-1] = max(self._outer[-1], peak)
        return peak


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by the tensors' storages, each storage counted once (views share one)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())
