"""The behaviour of the sparse methods on short reference runs, as JSON to diff before and after
a refactoring that must change nothing: every update line (mask digest and counts) and the
final metrics of each run.

    python benchmarks/behaviour_digest.py OUT.json [--runs dsl-mf-row ...] [--epochs 2]
                                          [--source DIR]

Each run is lastfm with the settings of configs/experiment/<model>_lastfm.yaml and
configs/tuned/<model>_lastfm_<method>.yaml, cut to `--epochs` epochs with an update every 10
steps, on real ranks under torchrun; equal files mean the same masks after every update and
the same metrics (`seconds` and memory figures are left
out: they are timings).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dsl_dist.report.runs import read_events

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "lastfm"
MODELS = {"mf-row": ("mf", "row_wise", 2), "mf-dp": ("mf", "data_parallel", 2),
          "lightgcn": ("lightgcn", "row_wise", 2), "neumf": ("neumf", "table_wise", 2),
          "multvae": ("multvae", "row_wise", 2)}
"""Reference runs: model, sharding type and ranks."""
RUNS = {f"{method}-{name}": (method, *spec) for method in ("dsl", "block_dsl")
        for name, spec in MODELS.items()
        # block_dsl pools shard table- or row-wise and sparsify tables only
        if not (method == "block_dsl" and name in ("mf-dp", "multvae"))}
UPDATE_KEYS = ("step", "budget", "active", "dropped", "grown", "regrown", "fraction",
               "density", "mask_digest", "blocks")


def run(name: str, epochs: int, source: Path, work: Path) -> dict[str, Any]:
    """One reference run's update lines and final metrics."""
    method, model, sharding, ranks = RUNS[name]
    run_dir = work / name
    overrides = [f"+experiment={model}_lastfm", f"sparsity={method}", "sparsity.density=0.2",
                 "sparsity.delta_t=10", f"train.epochs={epochs}", f"eval.every_epochs={epochs}",
                 f"model.sharding_type={sharding}", f"data.source={source}",
                 f"data.path={work / 'data' / model}", f"run_dir={run_dir}"]
    if method == "block_dsl" and model == "neumf":
        overrides.append("sparsity.tables=[user_mlp,item_mlp]")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(ranks), "-m", "dsl_dist.train", *overrides],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: the run failed:\n{done.stderr[-3000:]}")
    events = read_events(run_dir)
    updates = [{k: e[k] for k in UPDATE_KEYS if k in e} for e in events if e["event"] == "update"]
    final = [e for e in events if e["event"] == "eval"][-1]
    return {"updates": updates, "losses": [e["loss"] for e in events if e["event"] == "epoch"],
            "final": {k: v for k, v in final.items() if "@" in k}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--source", type=Path, default=SOURCE, help="lastfm's text files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = {}
        for name in args.runs:
            result[name] = run(name, args.epochs, args.source, Path(work))
            print(f"{name}: {len(result[name]['updates'])} updates, {result[name]['final']}",
                  file=sys.stderr)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
