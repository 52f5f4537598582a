"""The GPU check's steps (see gpu_check.py) and the runner that keeps each within its time limit
and writes the JSON after each run and step."""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from gpu_targets import ratio, summary, targets
from gpu_training import DENSITY, METHODS, Mode, compose, cpu_mode, cuda_mode, train_run

REPO = Path(__file__).resolve().parents[1]
STEPS = ("plain_loop", "train_mf", "train_lightgcn", "updates", "unit_tests", "pipeline",
         "memory")
"""In order of importance: a check cut short by its budget still has the first ones."""
TOUCHED = (0.03, 1.0)
"""Rows with a growth statistic in the synthetic updates (dsl at 3% first: its target)."""
PIPELINES = ("plain", "sparse_dist")
"""The `train.pipeline` variants the pipeline step compares (when TrainConfig has the field)."""
MEMORY_COMMAND = ["benchmarks/memory.py", "--device", "cuda"]
"""The memory step (when memory.py has a --device option)."""
MEMORY_ALIASES = {"unstructured": "dsl", "structured": "block_dsl"}
MIN_STEP_SECONDS = 1.0


class StepTimeout(BaseException):
    """A step ran past its limit (not an Exception, so that no `except Exception` in the code
    it runs swallows it)."""


class Skipped(Exception):
    """The step does not apply here; the message says why."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise StepTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _tail(text: str, chars: int = 2000) -> str:
    return text[-chars:]


def write(out: Path, result: dict[str, Any]) -> None:
    """Replaces `out` whole (a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(out)


class Check:
    """The check's state: its mode, the result so far (saved to `out` as it grows), a scratch
    directory, and the background preparation of LightGCN's propagation bags."""

    def __init__(self, mode: Mode, result: dict[str, Any], out: Path, work: Path) -> None:
        self.mode, self.result, self.out, self.work = mode, result, out, work
        self.deadline = float("inf")
        """When the running step must end (the child processes' timeouts follow it)."""
        self.preparing: Optional[subprocess.Popen] = None

    def save(self) -> None:
        plain = {r["batch"]: r["samples_per_s"] for r in self.result["plain_loop"] if r["ok"]}
        dense = {(r["model"], r["batch"]): r["samples_per_s"] for r in self.result["runs"]
                 if r["ok"] and r["method"] == "dense"}
        for r in self.result["runs"] + self.result["pipeline"]:
            if r["ok"]:
                r["vs_plain"] = ratio(r["samples_per_s"], plain.get(r["batch"]))
                r["vs_dense"] = ratio(r["samples_per_s"], dense.get((r["model"], r["batch"])))
        try:
            self.result["targets"] = targets(self.result)
        except Exception as error:  # a figure in an unforeseen form must not stop the check
            self.result["targets_error"] = f"{type(error).__name__}: {error}"
        write(self.out, self.result)

    def child(self, command: list[str], env: Optional[dict[str, str]] = None
              ) -> tuple[Optional[int], str]:
        """Runs `command` until the step's deadline: its exit status (None if it was
        stopped) and its output, all of it that came."""
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = process.communicate(timeout=max(1.0, self.deadline - time.time() - 2))
            return process.returncode, output
        except subprocess.TimeoutExpired:
            process.kill()
            return None, process.communicate()[0]

    def plain_loop(self) -> str:
        from plain_torchrec_mf import measure

        warmup, steps = self.mode.plain_steps
        self.result["plain_loop"] = []
        for batch in self.mode.batches:
            self.result["plain_loop"].append(
                {"ok": True, **measure(torch.device(self.mode.device), batch, steps, warmup)})
            self.save()
        return " ".join(f"{r['samples_per_s']:,.0f}/s" for r in self.result["plain_loop"])

    def _train(self, key: str, runs: list[tuple[str, str, int, Optional[str]]]) -> str:
        """Trains `runs` (model, method, batch, pipeline), replacing their rows in
        result[key]."""
        failed = []
        for model, method, batch, pipeline in runs:
            row = train_run(self.mode, model, method, batch, pipeline, self.work)
            self.result[key] = [r for r in self.result[key] if (
                r["model"], r["method"], r["batch"], r.get("pipeline")) != (
                model, method, batch, pipeline)] + [row]
            self.save()
            shown = {k: v for k, v in row.items() if k not in ("profile", "error")}
            print(json.dumps(shown), row.get("error", "").strip().splitlines()[-1:], flush=True)
            failed += [] if row["ok"] else [row]
        if failed:
            last = failed[0]["error"].strip().splitlines()[-1]
            raise RuntimeError(f"{len(failed)} of {len(runs)} runs failed, the first with {last}")
        return f"{len(runs)} runs"

    def train_mf(self) -> str:
        return self._train("runs", [("mf", m, b, None) for m in METHODS
                                    for b in self.mode.batches])

    def train_lightgcn(self) -> str:
        if self.preparing is not None:  # the propagation bags, made in the background
            code = self.preparing.wait()
            self.preparing = None
            if code:
                raise RuntimeError(f"preparing LightGCN's propagation bags failed ({code})")
        return self._train("runs", [("lightgcn", m, b, None) for m in METHODS
                                    for b in self.mode.batches])

    def pipeline(self) -> str:
        from dataclasses import fields

        from dsl_dist.config import TrainConfig

        if "pipeline" not in {f.name for f in fields(TrainConfig)}:
            raise Skipped("train.pipeline is not in this build")
        return self._train("pipeline", [("mf", "dense", b, p) for p in PIPELINES
                                        for b in self.mode.batches])

    def updates(self) -> str:
        """One drop-and-grow per method and touched fraction, in one child process (the
        tables of 10^9 weights leave this one's memory alone)."""
        specs = [(m, t) for m in ("dsl", "block_dsl") for t in TOUCHED]
        code, output = self.child([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                                   "--child", "updates", str(self.mode.update_weights),
                                   str(self.mode.update_dim),
                                   *(f"{m}:{t}" for m, t in specs)])
        done = {(r["method"], r["touched_rows"]): r for r in
                (json.loads(line) for line in output.splitlines() if line.startswith("{"))}
        self.result["updates"] = []
        for method, touched in specs:
            row = done.get((method, touched))
            if row is None:
                self.result["updates"].append({"method": method, "touched_rows": touched,
                                               "ok": False, "error": _tail(output, 1500)})
                continue
            cuda = row.get("peak_cuda_mb") is not None
            before = row.get("allocated_mb_before") if cuda else row.get("rss_mb_before")
            peak = row["peak_cuda_mb"] if cuda else row.get("peak_rss_mb")
            self.result["updates"].append({"ok": True, **row, "extra_mb": (
                peak - before if peak is not None and before is not None else None)})
        self.save()
        if code != 0:
            raise RuntimeError(f"exit status {code}: {_tail(output, 300)}")
        return f"{len(done)} updates"

    def unit_tests(self) -> str:
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                   "-rs", *self.mode.test_paths]
        code, output = self.child(command, {**os.environ, "DSL_TEST_DEVICE": self.mode.device})
        last = [line for line in output.splitlines() if re.search(r" in [\d.]+s", line)]
        counts = {kind: int(n) for n, kind in re.findall(
            r"(\d+) (passed|failed|errors?|skipped|deselected)", last[-1] if last else "")}
        self.result["unit_tests"] = {
            "command": f"DSL_TEST_DEVICE={self.mode.device} python " + " ".join(command[1:]),
            "ok": code == 0, **counts, **({} if code == 0 else {"output": _tail(output)})}
        self.save()
        if code != 0:
            raise RuntimeError(f"pytest exit status {code}: {counts}")
        return " ".join(f"{n} {kind}" for kind, n in counts.items())

    def memory(self) -> str:
        if self.mode.device != "cuda":
            raise Skipped("CUDA only (memory.py's own test rehearses its CUDA mode)")
        if "--device" not in (REPO / MEMORY_COMMAND[0]).read_text():
            raise Skipped("benchmarks/memory.py has no --device option in this build")
        code, output = self.child([sys.executable, *MEMORY_COMMAND])
        runs = memory_runs(output)
        self.result["memory"] = {"command": " ".join(MEMORY_COMMAND), "ok": code == 0,
                                 "runs": runs, **({} if code == 0 else {"output": _tail(output)})}
        self.save()
        if code != 0:
            raise RuntimeError(f"exit status {code}: {_tail(output, 300)}")
        return f"{len(runs)} runs"

    def prepare_lightgcn(self) -> None:
        """Prepares the data set here, then LightGCN's propagation bags in a child process on
        most of the cores, while the first steps use the GPU."""
        from dsl_dist.data.prepare import ensure_prepared

        overrides = [f"+experiment={self.mode.experiments['lightgcn']}"
                     if "lightgcn" in self.mode.experiments else "model=lightgcn", *self.mode.data]
        cfg = compose(overrides)
        d = cfg.data
        ensure_prepared(Path(d.source), Path(d.path), name=d.name, num_shards=d.num_shards,
                        seed=cfg.train.seed, valid_fraction=d.valid_fraction)
        cores = sorted(os.sched_getaffinity(0))
        mine = cores[len(cores) // 4:] if len(cores) >= 8 else cores
        self.preparing = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--child", "prepare",
             *overrides], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(len(mine))},
            preexec_fn=lambda: os.sched_setaffinity(0, mine))


def memory_runs(output: str) -> list[dict[str, Any]]:
    """memory.py's runs at the check's density (and dense's), from the JSON lines it printed
    and the JSON files it says it wrote, with the method named as the check names it."""
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    for path in re.findall(r"wrote (\S+\.json)", output):
        rows += json.loads((REPO / path).read_text()).get("runs", [])
    return [{**r, "method": MEMORY_ALIASES.get(r["method"], r["method"])}
            for r in rows if "method" in r and r.get("density", DENSITY) in (1.0, DENSITY)]


def machine(mode: Mode, versions: dict[str, Optional[str]]) -> dict[str, Any]:
    """The device and the versions the figures belong to."""
    on_cuda = mode.device == "cuda"
    return {"device": torch.cuda.get_device_name(0) if on_cuda else platform.processor() or "cpu",
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "platform": platform.platform(),
            **versions}


def run_step(check: Check, name: str, limit: float) -> dict[str, Any]:
    """One step within `limit` seconds: its status (ok, failed, timeout, skipped), seconds
    and a note."""
    started = time.time()
    check.deadline = started + limit
    status, note = "ok", ""
    try:
        with time_limit(limit):
            note = getattr(check, name)()
    except StepTimeout as stop:
        status, note = "timeout", str(stop)
    except Skipped as reason:
        status, note = "skipped", str(reason)
    except Exception as error:  # recorded; the next step still runs
        status, note = "failed", f"{type(error).__name__}: {error}"
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    return {"status": status, "seconds": time.time() - started, "limit_s": limit,
            "note": _tail(note, 500)}


def run_check(cpu: bool, gowalla: Path, work: Path, steps: list[str], out: Path,
              budget: Optional[float], versions: dict[str, Optional[str]],
              previous: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Runs `steps` (merged into `previous`, the JSON of an earlier check of the same mode,
    if any) and returns the result, printing its summary."""
    from gpu_training import write_tiny_dataset

    started = time.time()
    mode = cpu_mode(write_tiny_dataset(work / "tiny"), work / "tiny-prepared") if cpu \
        else cuda_mode(gowalla)
    deadline = started + (budget or mode.budget)
    fresh = {"mode": mode.device, "batches": list(mode.batches), "density": DENSITY,
             "update_weights": mode.update_weights, "steps": {}, "plain_loop": [], "runs": [],
             "pipeline": [], "updates": [], "unit_tests": {}, "memory": {}}
    result = previous if previous and previous.get("mode") == mode.device else fresh
    result["machine"] = machine(mode, versions)
    check = Check(mode, result, out, work)
    if "train_lightgcn" in steps:
        try:
            check.prepare_lightgcn()
        except Exception:  # the LightGCN step then fails on its own, and says why
            print(traceback.format_exc(), file=sys.stderr, flush=True)
    for name in steps:
        limit = min(mode.limits[name], deadline - time.time())
        result["steps"][name] = (run_step(check, name, limit) if limit >= MIN_STEP_SECONDS else
                                 {"status": "skipped", "note": "out of the check's budget"})
        print(f"step {name}: {json.dumps(result['steps'][name])}", flush=True)
        check.save()
    result["ok"] = all(s["status"] in ("ok", "skipped") for s in result["steps"].values())
    result["wall_seconds"] = time.time() - started
    result["cpu_seconds"] = sum(os.times()[:4])  # does not grow with others' load as wall does
    check.save()
    print(summary(result), flush=True)
    print(f"wrote {out} ({'ok' if result['ok'] else 'FAILED'}, {result['wall_seconds']:.0f} s)")
    return result


def child(args: list[str]) -> None:
    """The check's child processes: `updates WEIGHTS DIM METHOD:TOUCHED...` prints one JSON
    line per update; `prepare OVERRIDES...` builds what the configured model derives from
    the data."""
    kind, *rest = args
    if kind == "updates":
        from synthetic_table import update_once

        weights, dim, *specs = rest
        for spec in specs:
            method, touched = spec.split(":")
            print(json.dumps(update_once(method, int(weights), int(dim), DENSITY,
                                         float(touched))), flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    elif kind == "prepare":
        from dsl_dist.model.registry import prepare_model_data

        cfg = compose(rest)
        prepare_model_data(cfg, Path(cfg.data.path))
    else:
        sys.exit(f"gpu_check --child: unknown kind {kind!r}")
