"""Runs one training job under torchrun and records its figures in benchmarks/results/.

    python benchmarks/train_benchmark.py NAME [hydra overrides...]

Prints and writes benchmarks/results/NAME.json: time per epoch, training samples/s, peak RSS
per rank, the final full-ranking metrics, the best evaluation chosen on validation (with
eval.select_split), and the exact command, so a figure can be reproduced.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def run_benchmark(name: str, overrides: list[str], results: Path = RESULTS,
                  nproc: int = 2) -> dict:
    """Runs one torchrun job with `overrides`, writes results/NAME.json and returns it."""
    run_dir = REPO / "runs" / f"benchmark-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), "-m", "dsl_dist.train", *overrides,
               f"run_dir={run_dir}"]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    wall = time.perf_counter() - started

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    best = next((e for e in events if e["event"] == "best"), None)
    all_evals = [e for e in events if e["event"] == "eval"]
    evals = [e for e in all_evals if best is None or e["split"] == best["split"]]  # reported
    updates = [e for e in events if e["event"] == "update"]
    train_seconds = sum(e["seconds"] for e in epochs)
    update_seconds = sum(e["seconds"] for e in updates)
    samples = sum(e["samples_per_s"] * e["seconds"] for e in epochs)
    result = {
        "name": name,
        "overrides": overrides,
        "world_size": nproc,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "epochs": len(epochs),
        "seconds_per_epoch": mean(e["seconds"] for e in epochs),
        "train_samples_per_s": samples / train_seconds,
        "train_samples_per_s_between_updates": samples / (train_seconds - update_seconds),
        "updates": len(updates),
        "update_seconds_total": update_seconds,
        "update_time_fraction": update_seconds / train_seconds,
        "final_density": updates[-1]["density"] if updates else None,
        "peak_rss_mb_per_rank": [max(e["peak_rss_mb"][r] for e in epochs) for r in range(nproc)],
        "final_loss": epochs[-1]["loss"],
        "final_metrics": {k: v for k, v in evals[-1].items()
                          if k.startswith(("recall@", "ndcg@"))},
        "learning_curve": [{"epoch": e["epoch"], "split": e["split"],
                            **{k: v for k, v in e.items() if k.startswith(("recall@", "ndcg@"))}}
                           for e in all_evals],
        "best": best,
        "eval_seconds": evals[-1]["seconds"],
        "wall_seconds": wall,
    }
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    result = run_benchmark(argv[0], argv[1:], nproc=int(os.environ.get("NPROC", "2")))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
