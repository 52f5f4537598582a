"""The GPU check's training runs (gpu_check.py): what differs between the GPU check and its CPU
rehearsal, and one run of the real trainer with its timed and profiled windows."""

from __future__ import annotations

import gc
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gpu_profile import Plan, StepWindows

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dense", "dsl", "block_dsl")
DENSITY = 0.2


@dataclass(frozen=True)
class Mode:
    """What differs between the GPU check and its CPU rehearsal."""

    device: str
    batches: tuple[int, int]
    """The configured batch size and the large one (>= 32,768 on a GPU)."""
    data: list[str]
    """Overrides of every run naming its data."""
    experiments: dict[str, str]
    """+experiment of each model (absent: model=<name> with the defaults)."""
    windows: tuple[int, int, int]
    """Steps of warm-up (an update at half of it), then at least this many timed and this
    many profiled (see gpu_profile.Plan)."""
    plain_steps: tuple[int, int]
    """Warm-up and timed steps of the plain TorchRec loop."""
    update_weights: int
    update_dim: int
    test_paths: list[str]
    """Where `pytest -m cuda` looks: all of tests/ on CUDA; on CPU, where CI runs every marked
    test anyway, one file of them."""
    limits: dict[str, float]
    """Seconds each step may take."""
    budget: float
    """Seconds all the steps may take."""


def cuda_mode(gowalla: Path) -> Mode:
    """gowalla at its configured batch (2,048) and at 32,768; the 10^9-weight updates. The
    budget keeps the whole check, start-up included, within 7 minutes of one H200; the
    steps' limits add up to more, so the last ones take what the first leave."""
    return Mode("cuda", (2048, 32768),
                [f"data.source={gowalla}", f"data.path={REPO / 'data' / 'gowalla'}"],
                {"mf": "mf_gowalla", "lightgcn": "lightgcn_gowalla"}, (30, 100, 20), (20, 200),
                10**9, 64, ["tests"],
                {"plain_loop": 40, "train_mf": 100, "train_lightgcn": 130, "updates": 110,
                 "unit_tests": 90, "pipeline": 45, "memory": 120}, budget=400)


def cpu_mode(source: Path, prepared: Path) -> Mode:
    """A tiny generated data set at batches of 64 and 256, one small table for the updates."""
    steps = ("plain_loop", "train_mf", "train_lightgcn", "updates", "unit_tests", "pipeline",
             "memory")
    return Mode("cpu", (64, 256),
                ["data.name=tiny", f"data.source={source}", f"data.path={prepared}",
                 "data.num_shards=1", "model.embedding_dim=16"],
                {}, (2, 2, 2), (1, 2), 1 << 16, 16, ["tests/test_fastops.py"],
                dict.fromkeys(steps, 300.0), budget=1200)


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


def compose(overrides: list[str]) -> Any:
    """The job config of `overrides`, as `python -m dsl_dist.train` composes it."""
    from dsl_dist.config.compose import compose_job

    return compose_job(overrides)


def overrides(mode: Mode, model: str, method: str, batch: int, pipeline: Optional[str],
              run_dir: Path) -> list[str]:
    """A run that updates once, halfway through its warm-up, and never after."""
    experiment = mode.experiments.get(model)
    update_at = mode.windows[0] // 2
    return [f"+experiment={experiment}" if experiment else f"model={model}",
            f"sparsity={method}", *mode.data, f"data.batch_size={batch}", f"run_dir={run_dir}",
            "train.progress=false", "train.tensorboard=false", "train.log_every=0",
            "checkpoint.every=0",
            *([f"sparsity.density={DENSITY}", f"sparsity.delta_t={update_at}",
               f"sparsity.t_end={update_at}"] if method != "dense" else []),
            *([f"train.pipeline={pipeline}"] if pipeline else [])]


def train_run(mode: Mode, model: str, method: str, batch: int, pipeline: Optional[str],
              work: Path) -> dict[str, Any]:
    """One run's row: its figures (see `_windows`), or ok false and the error."""
    run_dir = work / f"{model}-{method}-{batch}-{pipeline or 'default'}-{time.time_ns()}"
    row: dict[str, Any] = {"model": model, "method": method, "batch": batch,
                           "pipeline": pipeline, "density": DENSITY if method != "dense" else 1.0,
                           "ok": False}
    started = time.perf_counter()
    try:
        row.update(_windows(compose(overrides(mode, model, method, batch, pipeline, run_dir)),
                            mode, batch))
        row["ok"] = True
    except Exception:  # recorded in the row; the next run still runs
        row["error"] = traceback.format_exc()[-2000:]
    row["wall_seconds"] = time.perf_counter() - started
    return row


def _windows(cfg: Any, mode: Mode, batch: int) -> dict[str, Any]:
    """Builds the trainer (one rank), trains through the windows of `mode` and returns their
    figures, the whole run's peak CUDA memory, and what metrics.jsonl logged."""
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.train import build_trainer

    gc.collect()  # the runs before leave nothing allocated to count in this one's peak
    on_cuda = mode.device == "cuda"
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer = build_trainer(cfg)
        plan = Plan.of(*mode.windows, trainer.stream.steps_per_epoch)
        trainer.total_steps = plan.end
        windows = StepWindows(plan, trainer.ctx.device, trainer.sparsity.before_step)
        trainer.sparsity.before_step = windows  # type: ignore[method-assign]
        while trainer.step < trainer.total_steps:
            trainer.train_epoch()
        trainer.log.close()
        figures = windows.figures(batch * trainer.ctx.world_size)
        logged = _logged(trainer.log.path)
    finally:
        shutdown_distributed()
    return {**figures, "steps_per_epoch": trainer.stream.steps_per_epoch,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
            **logged}


def _logged(metrics: Path) -> dict[str, Any]:
    """The updates' seconds, the last one's active weights and budget, and the peak memory
    of the epochs and updates, from metrics.jsonl."""
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    updates = [e for e in events if e["event"] == "update"]
    phases = [e for e in events if e["event"] in ("epoch", "update")]
    peaks = {field: max(max(e[field]) for e in phases) for field in ("peak_rss_mb", "peak_cuda_mb")
             if phases and field in phases[0]}
    last = updates[-1] if updates else {}
    return {"updates": len(updates),
            "update_seconds": [e["seconds"] for e in updates],
            "active": last.get("active"), "budget": last.get("budget"),
            "phase_peaks_mb": peaks}
