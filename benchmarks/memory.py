"""What a model costs in memory and time, dense against the two sparse methods, at scale.

    python benchmarks/memory.py                       # both data sets, every run
    python benchmarks/memory.py --data synthetic --runs dsl:0.2 block_dsl:0.2
    python benchmarks/memory.py --device cuda         # on the GPU(s)

Each run is a 2-rank torchrun job (row-wise sharding, so both ranks hold half of every table;
with --device cuda one rank a GPU, at most 2) whose metrics.jsonl carries what the figures
need: the `memory` line (bytes of table weights, optimizer state and sparsity state counted
from the tensors, summed over the ranks, and each rank's RSS after imports, before the model
is built), and the peak RSS of every epoch, update and evaluation (and on CUDA the peak of
torch.cuda.max_memory_allocated, reset at each, so each run's own: `peak_cuda_mb`, per rank).
Writes, from one set of runs (named with _cuda after --device cuda and _steps<N> after
--max-steps N, e.g. memory_gowalla_cuda.json):

- benchmarks/results/memory_<data>.json: {"runs": [{"method", "density", "table_bytes",
  "optimizer_bytes", "sparsity_bytes", "peak_rss_mb", "baseline_rss_mb",
  "samples_per_s_between_updates", "update_seconds_mean", "device", and on CUDA
  "peak_cuda_mb"}, ...]} (the budget-sized-models issue; gpu_steps.memory_runs reads it);
- benchmarks/results/scale_synthetic.json: {"runs": [{"method", "density", "weights_per_rank",
  "update_seconds_mean", "peak_rss_mb_train", "peak_rss_mb_update", "peak_rss_mb_eval",
  "samples_per_s_between_updates", "update_extra_rss_mb", "table_mb_per_rank"}, ...]} (the
  scale issue; update_extra_rss_mb: per rank, the most an update's peak RSS rose above the RSS
  it started from, against the rank's table bytes).

The synthetic catalogue (generated once into data/, by seed): 2.4M users × 1M item ids, 4 train
and 1 test interaction per user, items drawn from a Zipf law (exponent 1.05) over a random order
of the item ids; only the ~0.7M items drawn get rows, so at dim 64 it holds 99.7M weights per
rank (the scale issue asks for at least 96M). Its evaluation scores 20,000 sampled
users (eval.max_users) within eval.memory_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SYNTHETIC = {"users": 2_400_000, "items": 1_000_000, "train_per_user": 4, "zipf": 1.05}
RUNS = ["dense:1.0", "dsl:0.2", "dsl:0.1", "block_dsl:0.2", "block_dsl:0.1"]
METHOD = {"dense": "dense", "dsl": "unstructured", "block_dsl": "structured"}
COMMON = ["model.embedding_dim=64", "model.sharding_type=row_wise", "model.init_std=0.01",
          "train.log_every=0"]
SPARSE = ["sparsity.growth=accumulated", "sparsity.growth_every=10"]
"""The sparse methods' settings (dense has none)."""
DATA = {
    "synthetic": ["data.name=synthetic", "data.batch_size=4096", "train.max_steps=300",
                  "eval.max_users=20000", "eval.memory_mb=256"],
    "gowalla": ["+experiment=mf_gowalla", "train.epochs=2", "eval.every_epochs=0"],
}
SPARSE_DATA = {"synthetic": ["sparsity.delta_t=50"], "gowalla": []}


def synthetic_dataset(directory: Path, seed: int = 0) -> Path:
    """The prepared synthetic catalogue (made on first use; a few minutes)."""
    from dsl_dist.data.prepare import write_dataset

    if (directory / "manifest.json").exists():
        return directory
    rng = np.random.default_rng(seed)
    users, items, per_user = (SYNTHETIC[k] for k in ("users", "items", "train_per_user"))
    ranks = np.arange(1, items + 1, dtype=np.float64) ** -SYNTHETIC["zipf"]
    popularity = np.cumsum(ranks / ranks.sum())
    order = rng.permutation(items)  # the popular items are spread over the ids
    draws = order[np.minimum(np.searchsorted(popularity, rng.random(users * (per_user + 1))),
                             items - 1)]
    user_ids = np.repeat(np.arange(users), per_user + 1)
    test = np.arange(len(user_ids)) % (per_user + 1) == per_user
    tables = {split: pa.table({"user": user_ids[rows], "item": draws[rows]})
              for split, rows in (("train", ~test), ("test", test))}
    write_dataset(tables, directory, name="synthetic", num_shards=8)
    return directory


def ranks(device: str) -> int:
    """2 on CPU; on CUDA one a GPU, at most 2 (refused in one line where there is none)."""
    if device == "cpu":
        return 2
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("memory.py --device cuda: torch sees no CUDA device")
    return min(2, torch.cuda.device_count())


def run(name: str, data: str, method: str, density: float, prepared: Optional[Path],
        device: str, extra: list[str]) -> Path:
    """One job on `device`; `prepared`: the data set's directory, else the data config's
    own; `extra`: more overrides."""
    run_dir = REPO / "runs" / f"memory-{data}-{device}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [*DATA[data], *COMMON, f"sparsity={method}", f"run_dir={run_dir}"]
    if method != "dense":
        overrides += [*SPARSE, *SPARSE_DATA[data], f"sparsity.density={density}"]
    overrides += extra
    if prepared is not None:
        overrides += [f"data.path={prepared}", f"data.source={prepared}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(ranks(device)), "-m", "dsl_dist.train", *overrides]
    print(" ".join(command), flush=True)
    hidden = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}  # CPU: even on a GPU box
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, **hidden})
    return run_dir


def figures(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    of = {kind: [e for e in events if e["event"] == kind] for kind in
          ("memory", "epoch", "update", "eval")}
    memory = of["memory"][0]
    train_seconds = sum(e["seconds"] for e in of["epoch"])
    update_seconds = sum(e["seconds"] for e in of["update"])
    samples = sum(e["samples_per_s"] * e["seconds"] for e in of["epoch"])

    world = len(memory["baseline_rss_mb"])

    def peak(kind: str, mark: str = "peak_rss_mb") -> list[float]:
        lines = [e for e in of[kind] if mark in e]
        return [max(e[mark][r] for e in lines) for r in range(world)] if lines else []

    def update_extra() -> list[float]:
        """Per rank, the most an update's peak rose above the RSS it started from."""
        lines = of["update"]
        return [max(e["peak_rss_mb"][r] - e["rss_mb_before"][r] for e in lines)
                for r in range(world)] if lines else []

    return {"memory": memory, "epochs": of["epoch"], "evals": of["eval"],
            "update_extra_mb": update_extra(),
            "samples_per_s_between_updates": samples / (train_seconds - update_seconds),
            "update_seconds_mean": (update_seconds / len(of["update"]) if of["update"]
                                    else None),
            "peak_train": peak("epoch"), "peak_update": peak("update"), "peak_eval": peak("eval"),
            "peak_cuda": [peak(kind, "peak_cuda_mb") for kind in ("epoch", "update", "eval")]}


def per_rank_max(peaks: list[list[float]]) -> list[float]:
    """Each rank's largest of the phases' peaks (phases that reported none left out)."""
    return [max(v) for v in zip(*[p for p in peaks if p])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["synthetic", "gowalla"],
                        choices=sorted(DATA))
    parser.add_argument("--runs", nargs="+", default=RUNS, help="method:density")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the jobs train (cpu even where a GPU is)")
    parser.add_argument("--max-steps", type=int, help="train.max_steps of every run (a "
                        "quicker, smaller measurement than the data set's epochs)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run directories")
    args = parser.parse_args()
    suffix = ("" if args.device == "cpu" else f"_{args.device}") + (
        "" if args.max_steps is None else f"_steps{args.max_steps}")
    extra = [] if args.max_steps is None else [f"train.max_steps={args.max_steps}"]
    for data in args.data:
        prepared = (synthetic_dataset(REPO / "data" / "synthetic-2.4m-1m") if data == "synthetic"
                    else None)
        memory_rows, scale_rows = [], []
        for spec in args.runs:
            method, density = spec.split(":")
            run_dir = run(spec.replace(":", "-"), data, method, float(density), prepared,
                          args.device, extra)
            row, scale = rows_of(figures(run_dir), method, float(density), args.device)
            memory_rows.append(row)
            scale_rows.append(scale)
            print(json.dumps(row), flush=True)
            if not args.keep_runs:
                shutil.rmtree(run_dir)
        write(RESULTS / f"memory_{data}{suffix}.json", memory_rows)
        if data == "synthetic":
            write(RESULTS / f"scale_synthetic{suffix}.json", scale_rows)


def rows_of(f: dict, method: str, density: float, device: str) -> tuple[dict, dict]:
    """A run's row of memory_<data>.json and of scale_synthetic.json."""
    m = f["memory"]
    world = len(m["baseline_rss_mb"])
    row = {"method": METHOD[method], "density": density, "device": device,
           "table_bytes": m["table_bytes"], "optimizer_bytes": m["optimizer_bytes"],
           "sparsity_bytes": m["sparsity_bytes"],
           "peak_rss_mb": per_rank_max([f["peak_train"], f["peak_update"], f["peak_eval"]]),
           **({"peak_cuda_mb": per_rank_max(f["peak_cuda"])} if any(f["peak_cuda"]) else {}),
           "baseline_rss_mb": m["baseline_rss_mb"],
           "samples_per_s_between_updates": f["samples_per_s_between_updates"],
           "update_seconds_mean": f["update_seconds_mean"],
           "recall@20": f["evals"][-1].get("recall@20") if f["evals"] else None}
    scale = {"method": row["method"], "density": density, "device": device,
             "weights_per_rank": m["weights"] // world,
             "update_seconds_mean": row["update_seconds_mean"],
             "peak_rss_mb_train": f["peak_train"], "peak_rss_mb_update": f["peak_update"],
             "peak_rss_mb_eval": f["peak_eval"], "update_extra_rss_mb": f["update_extra_mb"],
             "table_mb_per_rank": m["table_bytes"] / world / 2**20,
             "samples_per_s_between_updates": row["samples_per_s_between_updates"]}
    return row, scale


def write(path: Path, rows: list[dict]) -> None:
    """Writes `rows`, replacing the rows of the same (method, density) in an existing file."""
    old = json.loads(path.read_text())["runs"] if path.exists() else []
    keys = {(r["method"], r["density"]) for r in rows}
    merged = [r for r in old if (r["method"], r["density"]) not in keys] + rows
    path.write_text(json.dumps({"runs": merged}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
