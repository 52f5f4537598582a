"""What a rank's memory holds: resident set size and its peaks by phase, bytes of tensors.

Peaks come from Linux's high-water mark of the resident set (VmHWM), which writing "5" to
/proc/self/clear_refs resets, so a phase (an epoch, an update, an evaluation) reports its own
peak. Phases nest: an update's peak counts in its epoch's. Elsewhere the peak is the process's
maximum so far (ru_maxrss) and phases do not reset it. On a CUDA device the tables live in
device memory, which the RSS does not see: there phases also report the peak of
`torch.cuda.max_memory_allocated`, reset the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

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


@functools.cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"),
                       "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hands the C heap's free pages back to the OS. A pass over the tables in chunks (the
    initial masks, an update, an evaluation) frees its temporaries between small allocations
    that live on (each chunk's choice), so glibc cannot shrink its heap and the freed bytes
    stay in the RSS, which is what a container's memory limit counts."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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


class HighWaterMark:
    """The peak of one kind of memory since its last reset, in MiB."""

    def __init__(self, read: Callable[[], float], reset: Callable[[], object]) -> None:
        self.read, self.reset = read, reset


def high_water_marks(device: torch.device) -> dict[str, HighWaterMark]:
    """The peaks a phase on `device` reports, by event field: RSS, and on CUDA device memory."""
    marks = {"peak_rss_mb": HighWaterMark(peak_rss_mb, _reset_peak)}
    if device.type == "cuda":
        marks["peak_cuda_mb"] = HighWaterMark(
            lambda: torch.cuda.max_memory_allocated(device) / 2**20,
            lambda: torch.cuda.reset_peak_memory_stats(device))
    return marks


class PeakTracker:
    """Peaks of nested phases: `start()` a phase, `stop()` returns its peak of every mark (the
    process's RSS unless told others)."""

    def __init__(self, marks: Optional[dict[str, HighWaterMark]] = None) -> None:
        self.marks = marks if marks is not None else high_water_marks(torch.device("cpu"))
        self._outer: list[dict[str, float]] = []  # the peaks so far of each open phase

    def start(self) -> None:
        if self._outer:
            self._outer[-1] = self._merged(self._outer[-1])
        self._outer.append(dict.fromkeys(self.marks, 0.0))
        for mark in self.marks.values():
            mark.reset()

    def stop(self) -> dict[str, float]:
        peaks = self._merged(self._outer.pop())
        if self._outer:
            self._outer[-1] = {k: max(v, peaks[k]) for k, v in self._outer[-1].items()}
        return peaks

    def _merged(self, so_far: dict[str, float]) -> dict[str, float]:
        return {name: max(so_far[name], mark.read()) for name, mark in self.marks.items()}


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by the tensors' storages, each storage counted once (views share one)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


class TensorPeak:
    """What `tensor_peak()` measured: the most bytes of tensors allocated within its block
    that were alive at once (over those alive when it began), and those still alive at its
    end."""

    peak: int = 0
    left: int = 0


@contextmanager
def tensor_peak() -> Iterator[TensorPeak]:
    """Measures the live tensor bytes torch's allocators (CPU and CUDA) hand out within the
    block, from torch.profiler's memory events: a pass's transient memory, on any device, to
    the byte. Frees of tensors allocated before the block are not seen (the profiler knows
    not their size), so the peak can only be overstated. Slow: for tests and benchmarks."""
    from torch.profiler import ProfilerActivity, profile

    found = TensorPeak()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if torch.cuda.is_available() else [])
    # no garbage collection within the block: it could free tensors an earlier profile saw
    # allocated, whose frees the profiler then reports, understating what the block holds
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with profile(activities=activities, profile_memory=True) as profiler:
            yield found
    finally:
        if collecting:
            gc.enable()
    # only memory events have a size (some others' names do not even decode)
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                    if e.nbytes())
    for _, change in events:
        found.left += change
        found.peak = max(found.peak, found.left)
