"""Windows of training steps, timed and profiled: samples/s, the GPU's busy fraction, kernel
launches and host waits per step (benchmarks/gpu_check.py).

`StepWindows` hooks the sparsity method's `before_step`, which every training loop calls once
before each step (plain or pipelined), so it needs nothing from the loop itself: at the first
timed step it synchronises and starts a clock, at the first profiled step it stops the clock and
starts torch.profiler, and at the end step it stops the profiler. The timed window runs without
the profiler (its figures are the throughput); the profiled one gives per-step counts and the
kernel time, whose share of the timed window's step time is the busy fraction.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")
"""Runtime calls that make the host wait for the device (cudaMemcpy: the synchronous copy)."""


@dataclass(frozen=True)
class Activity:
    """One profiler event: kind is kineto's activity type (cpu_op, kernel, gpu_memcpy,
    gpu_memset, cuda_runtime, cuda_driver, ...)."""

    kind: str
    name: str
    start_ns: int
    end_ns: int


def activities(prof: profile) -> list[Activity]:
    events = prof.profiler.kineto_results.events()
    annotations = {e.name() for e in events if e.is_user_annotation()}
    return [Activity(kind(e, annotations), e.name(), e.start_ns(), e.end_ns()) for e in events]


def kind(event: Any, annotations: set[str]) -> str:
    """kineto's activity type of a profiler event. torch 2.11 does not expose it: there it
    follows from the device and the name (a device event named as a host annotation is that
    annotation's range on the GPU, not a kernel)."""
    if hasattr(event, "activity_type"):
        return event.activity_type()
    name = event.name()
    if event.device_type() != DeviceType.CPU:
        if name.startswith(("Memcpy", "Memset")):
            return "gpu_memcpy" if name.startswith("Memcpy") else "gpu_memset"
        return "gpu_user_annotation" if name in annotations else "kernel"
    return "cuda_runtime" if name.startswith("cu") else "cpu_op"


def busy_ns(intervals: Iterable[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals (kernels of several streams overlap)."""
    total, reach = 0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach) if start < reach else end - start
            reach = end
    return total


def summarise(events: list[Activity], steps: int, step_seconds: Optional[float]
              ) -> dict[str, Any]:
    """Per-step figures of a profiled window of `steps` steps; `step_seconds`: the step time
    measured without the profiler (the denominator of the busy fraction)."""
    kernels = [e for e in events if e.kind == "kernel"]
    syncs = Counter(e.name for e in events
                    if e.kind in ("cuda_runtime", "cuda_driver") and e.name in SYNCS)
    kernel_seconds = busy_ns((e.start_ns, e.end_ns) for e in kernels) / 1e9 / steps
    on_device = bool(kernels)
    return {
        "steps": steps,
        "kernels_per_step": len(kernels) / steps,
        "syncs_per_step": sum(syncs.values()) / steps,
        "syncs_per_step_by_call": {name: syncs[name] / steps for name in SYNCS},
        "copies_per_step": sum(e.kind == "gpu_memcpy" for e in events) / steps,
        "cpu_ops_per_step": sum(e.kind == "cpu_op" for e in events) / steps,
        "kernel_ms_per_step": kernel_seconds * 1e3 if on_device else None,
        "busy_fraction": (kernel_seconds / step_seconds
                          if on_device and step_seconds else None),
    }


@dataclass(frozen=True)
class Plan:
    """Steps (counted from 1) where the timed window starts, the profiled one starts (the
    timed one ends) and the profiled one ends; the run trains `end` steps."""

    timed_from: int
    profiled_from: int
    end: int

    @classmethod
    def of(cls, warmup: int, timed: int, profiled: int, steps_per_epoch: int) -> "Plan":
        """After `warmup` steps, at least `timed` then `profiled` steps. Where the run fits
        in one epoch, exactly those; otherwise each window is a whole number of epochs, so
        that it holds its share of the epochs' own costs whatever step it starts at."""
        if warmup + timed + profiled < steps_per_epoch:
            lengths = timed, profiled
        else:
            lengths = tuple(math.ceil(n / steps_per_epoch) * steps_per_epoch
                            for n in (timed, profiled))
        start = warmup + 1
        return cls(start, start + lengths[0], start + lengths[0] + lengths[1])


class StepWindows:
    """Times and profiles the windows of `plan` through a `before_step(step)` hook."""

    def __init__(self, plan: Plan, device: torch.device,
                 before_step: Callable[[int], None]) -> None:
        self.plan, self.device, self._inner = plan, device, before_step
        self._started = 0.0
        self._profiler: Optional[profile] = None
        self.timed_seconds: Optional[float] = None
        self.events: list[Activity] = []
        self.profile_error: Optional[str] = None

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, step: int) -> None:
        if step == self.plan.timed_from:
            self._synchronize()
            self._started = time.perf_counter()
        elif step == self.plan.profiled_from:
            self._synchronize()
            self.timed_seconds = time.perf_counter() - self._started
            kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                              if self.device.type == "cuda" else [])
            try:
                self._profiler = profile(activities=kinds)
                self._profiler.start()
            except Exception as error:  # the timed window stands without the profile
                self.profile_error = f"{type(error).__name__}: {error}"
                self._profiler = None
        elif step == self.plan.end and self._profiler is not None:
            self._synchronize()  # the window's last kernels end inside the profile
            self._profiler.stop()
            self.events = activities(self._profiler)
            self._profiler = None
        self._inner(step)

    def figures(self, samples_per_step: int) -> dict[str, Any]:
        """samples/s of the timed window and the profiled window's per-step figures (the
        window's closing synchronisation not counted)."""
        if self.timed_seconds is None or not (self.events or self.profile_error):
            raise RuntimeError(f"the run ended before step {self.plan.end}: windows incomplete")
        timed_steps = self.plan.profiled_from - self.plan.timed_from
        step_seconds = self.timed_seconds / timed_steps
        profiled: dict[str, Any] = {"error": self.profile_error}
        if self.events:
            profiled = summarise(self.events, self.plan.end - self.plan.profiled_from,
                                 step_seconds)
        if self.device.type == "cuda" and self.events:
            closing = 1 / profiled["steps"]
            profiled["syncs_per_step"] = max(0.0, profiled["syncs_per_step"] - closing)
            by_call = profiled["syncs_per_step_by_call"]
            by_call["cudaDeviceSynchronize"] = max(0.0, by_call["cudaDeviceSynchronize"] - closing)
        return {"samples_per_s": samples_per_step / step_seconds, "timed_steps": timed_steps,
                "step_ms": step_seconds * 1e3, "profile": profiled}
