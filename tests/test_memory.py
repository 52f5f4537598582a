"""PeakTracker: each phase reports its own peak of every high-water mark, nested phases
count in the phase around them (on CUDA the device's allocated memory is one more mark); freed
heap memory handed back to the OS."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from dsl_dist.memory import (HighWaterMark, PeakTracker, _malloc_trim, high_water_marks,
                             tensor_peak)

PINNED_HEAP = """
import numpy as np
from dsl_dist.memory import rss_mb, release_freed_memory
big = np.ones((16 << 20) // 8); del big  # glibc raises its mmap threshold past 4 MB
temporaries, survivors = [], []
for _ in range(100):  # 4 MB temporaries on the heap, each followed by a block that lives on
    temporaries.append(np.ones((4 << 20) // 8)); survivors.append(np.ones(512))
del temporaries
before = rss_mb(); release_freed_memory(); print(before, rss_mb())
"""


class FakeMark:
    """A high-water mark driven by the test: `use(mb)` raises it, `reset` lowers it to now."""

    def __init__(self) -> None:
        self.now = self.peak = 0.0

    def use(self, mb: float) -> None:
        self.now = mb
        self.peak = max(self.peak, mb)

    def reset(self) -> None:
        self.peak = self.now

    def mark(self) -> HighWaterMark:
        return HighWaterMark(lambda: self.peak, self.reset)


def test_nested_phases_report_their_own_peaks_and_count_in_the_outer_one() -> None:
    rss, device = FakeMark(), FakeMark()
    tracker = PeakTracker({"peak_rss_mb": rss.mark(), "peak_cuda_mb": device.mark()})
    tracker.start()  # an epoch
    rss.use(100.0)
    device.use(50.0)
    tracker.start()  # an update within it
    rss.use(300.0)
    rss.use(120.0)
    device.use(10.0)
    assert tracker.stop() == {"peak_rss_mb": 300.0, "peak_cuda_mb": 50.0}
    device.use(20.0)
    tracker.start()  # a later update: the first one's peaks were reset
    assert tracker.stop() == {"peak_rss_mb": 120.0, "peak_cuda_mb": 20.0}
    assert tracker.stop() == {"peak_rss_mb": 300.0, "peak_cuda_mb": 50.0}


def test_a_cpu_device_reports_rss_only() -> None:
    marks = high_water_marks(torch.device("cpu"))
    assert list(marks) == ["peak_rss_mb"]
    tracker = PeakTracker(marks)
    tracker.start()
    peaks = tracker.stop()
    assert list(peaks) == ["peak_rss_mb"] and peaks["peak_rss_mb"] > 0


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim")
def test_freed_heap_pinned_by_live_blocks_leaves_the_rss() -> None:
    """What a chunked pass leaves (400 MB of freed temporaries between small live blocks)
    stays in the RSS until release_freed_memory; run in a fresh process, whose heap is known."""
    result = subprocess.run([sys.executable, "-c", PINNED_HEAP], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=True)
    before, after = map(float, result.stdout.split())
    assert before - after > 300, (before, after)


def test_tensor_peak_does_not_count_frees_of_an_earlier_profiles_garbage() -> None:
    """A collection inside the block would free garbage whose size an earlier profile saw,
    and the profiler would report that free: the block's live bytes would read 0 here."""
    with tensor_peak():
        cycle = [torch.ones(1 << 18)]  # 1 MiB whose size this profile sees
        cycle.append(cycle)
    del cycle  # garbage, freed whenever the collector runs
    with tensor_peak() as found:
        kept = torch.ones(1 << 18)
        gc.collect()
    assert (1 << 20) <= found.left < (1 << 20) + 4096, found.left
    del kept


def test_tensor_peak_counts_the_most_bytes_alive_at_once_within_the_block() -> None:
    before = torch.ones(1 << 18)  # 1 MiB alive before: not counted, nor its free
    with tensor_peak() as found:
        first = torch.ones(1 << 20)  # 4 MiB
        second = first * 2  # 8 MiB alive
        del first
        third = torch.ones(3 << 18)  # 7 MiB alive
        del before
    small = 4096  # torch's own scalars (the 2 above)
    assert 8 << 20 <= found.peak < (8 << 20) + small
    assert 7 << 20 <= found.left < (7 << 20) + small
    del second, third
