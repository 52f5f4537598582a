"""The CUDA path in one prepared command, for the short slots of GPU time there are.

    make gpu-check                      # on a GPU machine: .venv-cuda, then this script
    python benchmarks/gpu_check.py      # the same, with the packages already installed
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check.json   # CI: tiny, on CPU

On one GPU (two ranks if two are visible; NCCL) it runs, in order:

1. the unit tests marked `cuda` (`pytest -m cuda`) with DSL_TEST_DEVICE=cuda, so that they put
   their tensors on the GPU (tests/conftest.py's `device` fixture);
2. short MF and LightGCN runs on gowalla (in this process on one rank, under torchrun on
   two), dense vs unstructured DSL (`dsl`) vs structured DSL (`block_dsl`) at d=0.2, and MF
   DSL with FBGEMM's fused Adam on the tables (CUDA only):
   samples/s between updates, seconds per update, the masks' active weights against the
   budget, peak memory (`torch.cuda.max_memory_allocated`, from the runs' metrics.jsonl);
3. one drop-and-grow of each DSL method on a synthetic catalogue table of 10^8 weights, built
   in this process (world size 1), with random growth statistics;

and writes benchmarks/results/gpu_check.json: the GPU's name, the versions, every figure, and
whether each step passed. A step that fails is recorded (with the end of its output) and the
next one still runs, so that one slot yields all it can; the exit status is then 1.

`--cpu` runs the same steps on CPU (gloo, the CPU optimizers, peak RSS for memory) on a tiny
generated data set and a small table, writing to `--out`, so that the script cannot rot while
no GPU is at hand (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "gpu_check.json"
DENSITY = 0.2
METHODS = ("dense", "dsl", "block_dsl")
SYNTHETIC_WEIGHTS = {"cuda": 10**8, "cpu": 1 << 16}
"""Weights of the synthetic catalogue's table (dimension 64 on CUDA, 16 on CPU)."""


@dataclass(frozen=True)
class Mode:
    """What differs between a GPU check and its CPU rehearsal."""

    device: str
    """cuda or cpu: DSL_TEST_DEVICE of the unit tests, and where the synthetic table lives."""
    backend: str
    world_size: int
    data: list[str]
    """Overrides of every training run: the data set and the run's length."""
    experiments: dict[str, str]
    """+experiment of each model (empty: the defaults, with the model group)."""
    extra_runs: list[tuple[str, str, str]]
    """(model, method, optimizer) beyond every model × method with its own optimizer."""
    memory_field: str
    """The metrics.jsonl field of a phase's peak memory."""
    embedding_dim: int
    test_paths: list[str]
    """Where `pytest -m cuda` looks: all of tests/ on CUDA; on CPU, where CI runs every marked
    test in the suite anyway, one file of them, which checks the step itself."""


def cuda_mode(gowalla: Path) -> Mode:
    """gowalla, 300 steps (updates at 100 and 200), 2,000 sampled users evaluated."""
    world = min(2, torch.cuda.device_count())
    return Mode("cuda", "nccl", world,
                [f"data.source={gowalla}", f"data.path={REPO / 'data' / 'gowalla'}",
                 "train.max_steps=300", "sparsity.delta_t=100",
                 "eval.max_users=2000"],
                {"mf": "mf_gowalla", "lightgcn": "lightgcn_gowalla"},
                [("mf", "dsl", "adam")], "peak_cuda_mb", 64, ["tests"])


def cpu_mode(source: Path, prepared: Path) -> Mode:
    """The tiny data set, 8 steps of 64 positives (updates at 3 and 6), one rank."""
    return Mode("cpu", "gloo", 1,
                ["data.name=tiny", f"data.source={source}", f"data.path={prepared}",
                 "data.batch_size=64", "data.num_shards=1", "model.embedding_dim=16",
                 "train.max_steps=8", "train.log_every=0", "sparsity.delta_t=3",
                 "eval.max_users=50"],
                {}, [], "peak_rss_mb", 16, ["tests/test_fastops.py"])


def write_tiny_dataset(directory: Path, users: int = 200, items: int = 100,
                       per_user: int = 12, seed: int = 0) -> Path:
    """LightGCN-format train/test files of clustered preferences (users favour the items of
    their cluster), small enough for CI."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for user in range(users):
        chosen = rng.choice(np.arange(user % 4, items, 4), size=per_user, replace=False)
        train.append(" ".join(map(str, [user, *chosen[:9]])))
        test.append(" ".join(map(str, [user, *chosen[9:]])))
    (directory / "train.txt").write_text("\n".join(train) + "\n")
    (directory / "test.txt").write_text("\n".join(test) + "\n")
    return directory


def machine(mode: Mode) -> dict[str, Any]:
    """The device and the versions the figures belong to."""
    def version(*names: str) -> Optional[str]:
        for name in names:
            try:
                return f"{name} {metadata.version(name)}"
            except metadata.PackageNotFoundError:
                pass
        return None

    on_cuda = mode.device == "cuda"
    return {"device": torch.cuda.get_device_name(0) if on_cuda else platform.processor() or "cpu",
            "device_count": torch.cuda.device_count() if on_cuda else 0,
            "cuda": torch.version.cuda, "torch": torch.__version__,
            "fbgemm": version("fbgemm-gpu", "fbgemm-gpu-cpu"),
            "torchrec": version("torchrec"), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count()}


def _tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


def unit_tests(mode: Mode) -> dict[str, Any]:
    """`pytest -m cuda` on the mode's device; the counts from pytest's summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
               *mode.test_paths]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DSL_TEST_DEVICE": mode.device})
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|error|skipped)",
                                                     done.stdout.splitlines()[-1]
                                                     if done.stdout else "")}
    result: dict[str, Any] = {"command": f"DSL_TEST_DEVICE={mode.device} " + " ".join(command),
                              "ok": done.returncode == 0, **counts}
    if not result["ok"]:
        result["output"] = _tail(done.stdout + done.stderr)
    return result


def launch(overrides: list[str], world_size: int) -> Optional[str]:
    """Trains with `overrides`: in this process for one rank (a group of one, as a plain
    `python -m dsl_dist.train` forms; it spares each run the imports), else under torchrun.
    Returns the end of the output of a failed run, None after a good one."""
    if world_size > 1:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", str(world_size), "-m", "dsl_dist.train",
                               *overrides], cwd=REPO, capture_output=True, text=True)
        return None if done.returncode == 0 else _tail(done.stdout + done.stderr)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dsl_dist.cli import CONFIG_DIR
    from dsl_dist.config import register_configs
    from dsl_dist.train import run

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
        run(cfg)  # type: ignore[arg-type]
    except Exception:  # recorded; the exit status says it failed
        return _tail(traceback.format_exc())
    return None


def training_run(mode: Mode, model: str, method: str, optimizer: Optional[str],
                 runs_dir: Path) -> dict[str, Any]:
    """One training run and its figures (see `run_figures`)."""
    run_dir = runs_dir / f"{model}-{method}{'-' + optimizer if optimizer else ''}"
    experiment = mode.experiments.get(model)
    overrides = [f"+experiment={experiment}" if experiment else f"model={model}",
                 f"sparsity={method}", f"backend={mode.backend}", f"run_dir={run_dir}",
                 *mode.data, *([f"sparsity.density={DENSITY}"] if method != "dense" else []),
                 *([f"train.optimizer={optimizer}"] if optimizer else [])]
    started = time.perf_counter()
    failure = launch(overrides, mode.world_size)
    result: dict[str, Any] = {"model": model, "method": method,
                              "density": DENSITY if method != "dense" else 1.0,
                              "world_size": mode.world_size, "backend": mode.backend,
                              "overrides": overrides, "ok": failure is None,
                              "wall_seconds": time.perf_counter() - started}
    if failure is not None:
        return {**result, "output": failure}
    config = (run_dir / "config.yaml").read_text()
    result["optimizer"] = re.search(r"^  optimizer: (\w+)", config, re.M).group(1)
    return {**result, **run_figures(run_dir / "metrics.jsonl", mode.memory_field)}


def run_figures(metrics: Path, memory_field: str) -> dict[str, Any]:
    """samples/s between updates (epoch time less update time), seconds per update, the last
    update's active weights and budget, each rank's peak of `memory_field` over the epochs
    and updates, and the final recall@20."""
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    of = {kind: [e for e in events if e["event"] == kind] for kind in ("epoch", "update", "eval")}
    train_seconds = sum(e["seconds"] for e in of["epoch"])
    update_seconds = sum(e["seconds"] for e in of["update"])
    samples = sum(e["samples_per_s"] * e["seconds"] for e in of["epoch"])
    phases = of["epoch"] + of["update"]
    last = of["update"][-1] if of["update"] else {}
    return {"samples_per_s_between_updates": samples / (train_seconds - update_seconds),
            "updates": len(of["update"]),
            "seconds_per_update": update_seconds / len(of["update"]) if of["update"] else None,
            "active": last.get("active"), "budget": last.get("budget"),
            "peak_memory_mb": [max(e[memory_field][r] for e in phases)
                               for r in range(len(phases[0][memory_field]))],
            "memory": memory_field,
            "recall@20": of["eval"][-1].get("recall@20") if of["eval"] else None}


def synthetic_update(mode: Mode, method: str) -> dict[str, Any]:
    """One drop-and-grow of `method` at d=0.2 on a one-table catalogue of the mode's size
    (world size 1; see benchmarks/synthetic_table.py)."""
    from synthetic_table import update_once

    return update_once(method, SYNTHETIC_WEIGHTS[mode.device], mode.embedding_dim, DENSITY)


def check(mode: Mode, runs_dir: Path) -> dict[str, Any]:
    """Every step of the check (see the module docstring), recorded as it went."""
    started = time.perf_counter()
    result: dict[str, Any] = {"mode": mode.device, "machine": machine(mode),
                              "unit_tests": unit_tests(mode), "runs": [], "synthetic_update": []}
    plan = [(model, method, None) for model in ("mf", "lightgcn") for method in METHODS]
    for model, method, optimizer in [*plan, *mode.extra_runs]:
        result["runs"].append(training_run(mode, model, method, optimizer, runs_dir))
        print(json.dumps(result["runs"][-1]), flush=True)
    for method in ("dsl", "block_dsl"):
        try:
            row = {"ok": True, **synthetic_update(mode, method)}
        except Exception as error:  # recorded; the exit status says it failed
            row = {"method": method, "ok": False, "output": f"{type(error).__name__}: {error}"}
        result["synthetic_update"].append(row)
        print(json.dumps(row), flush=True)
    result["ok"] = (result["unit_tests"]["ok"] and
                    all(r["ok"] for r in result["runs"] + result["synthetic_update"]))
    result["wall_seconds"] = time.perf_counter() - started
    times = os.times()  # CPU time, which does not grow with other jobs' load as wall time does
    result["cpu_seconds"] = sum(times[:4])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU rehearsal on a tiny generated data set (CI)")
    parser.add_argument("--out", type=Path, default=RESULT, help=f"default {RESULT}")
    parser.add_argument("--gowalla", type=Path, default=REPO.parent / "shared/data/gowalla",
                        help="gowalla's raw train/test files (GPU mode)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device; run with --cpu for the CPU rehearsal")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        work = Path(scratch)
        mode = (cpu_mode(write_tiny_dataset(work / "tiny"), work / "tiny-prepared") if args.cpu
                else cuda_mode(args.gowalla))
        result = check(mode, work / "runs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({'ok' if result['ok'] else 'FAILED'}, "
          f"{result['wall_seconds']:.0f} s)")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
