"""DSL against the dense model of the same size, each tuned and selected on validation.

    python benchmarks/equal_budget.py [--data gowalla] [--models mf lightgcn]
                                      [--settings dense:12 dsl:0.2 ...] [--lrs 0.05 0.1]
                                      [--epochs N] [--rerun] [--table-only]

The protocol: gowalla's train split loses 10% of each user's interactions to a validation
split (data.valid_fraction=0.1, a prepared copy of its own); lastfm has its own validation
split. Every run evaluates validation and
test every `--eval-every` epochs; its result is the epoch with the best validation Recall@20
(eval.select_split=valid), and of the learning rates in `--lrs` (the same grid and epochs for
every method) the one whose best validation Recall@20 is highest. Test never chooses anything.

A setting is `dense:DIM` (a dense model of `model.embedding_dim` DIM: for MF and LightGCN the
embedding width, 64 in full, 16 and 12 neighbouring density 0.2's budget, 8 and 4 density
0.1's; for NeuMF the width of the MLP path's tables, the ones DSL masks, 16 in full; for
Mult-VAE the hidden width, 600 in full) or `METHOD:DENSITY` with METHOD `dsl` (unstructured),
`block_dsl` (structured) or `set` (SET: DSL's magnitude drop, but growth at random, the
control for "does gradient growth matter?") on the full model, with the settings the
experiment tuned for the method (`configs/tuned/<model>_<data>_<method>.yaml`); a third part names a lever (`block_dsl:0.2:static`,
see LEVERS), reported as an ablation row with its `variant`, never chosen over the plain
settings (the dense models get no such extra tuning). A row's params are the model's
weights (every table and dense layer, sparsified ones at their final density). Each run writes
benchmarks/results/equal_budget/<data>/<model>-<setting>-lr<lr>.json (train_benchmark.py's
figures) and is skipped when that file exists unless --rerun; then
benchmarks/results/equal_budget.json and equal_budget.md are written from every run there.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from typing import Any

from reproduce import job_config, parameter_counts
from train_benchmark import RESULTS, run_benchmark

from dsl_dist.config import DropAndGrowConfig, UnstructuredConfig

RUNS = RESULTS / "equal_budget"
VALID_FRACTION = 0.1
DATA = {"gowalla": [f"data.path=data/gowalla-valid{int(VALID_FRACTION * 100)}",
                    f"data.valid_fraction={VALID_FRACTION}"],
        "lastfm": []}
"""Each data set's overrides for a validation split (lastfm's is its own valid.txt)."""
SETTINGS = ("dense:64", "dense:16", "dense:12", "dense:8", "dense:4", "dsl:0.2", "dsl:0.1",
            "block_dsl:0.2", "block_dsl:0.1", "set:0.2")
METHOD = {"dense": "dense", "dsl": "unstructured", "block_dsl": "structured",
          "set": "set (random growth)"}
LEVERS = {
    "static": ["sparsity.t_end=1"],  # the initial mask, never updated: the method's control
    "b4": ["sparsity.block.size=4"],
    "b16": ["sparsity.block.size=16"],
    "min1": ["sparsity.block.min_blocks=1"],
    "h0.3": ["sparsity.block.headroom=0.3"],
    # a sparse row starts with a dense row's norm: init_std / sqrt(density) at d=0.2
    "init": ["model.init_std=0.0224"],
    # the growth statistic summed over every step of the window, not every 10th
    "ge1": ["sparsity.growth_every=1"],
    # every row starts on the same first columns, as a dense model of width d × 64 (with
    # `static`: that model, stored sparse)
    "prefix": ["sparsity.init_mask=prefix"],
    # a smaller update fraction (the experiment config's zeta_0 is 0.8)
    "z0.2": ["sparsity.zeta_0=0.2"],
    # grown weights start at a random value of the initial weights' std, not at zero
    "growinit": ["sparsity.grow_init_std=0.01"],
}


def overrides(data: str, model: str, setting: str, lr: float, epochs: int | None,
              eval_every: int) -> list[str]:
    method, value, *lever = setting.split(":")
    common = [f"+experiment={model}_{data}", *DATA[data], "eval.select_split=valid",
              f"eval.every_epochs={eval_every}", "checkpoint.keep_best=false", f"train.lr={lr}"]
    if epochs:
        common.append(f"train.epochs={epochs}")
    if method == "dense":
        return [*common, f"model.embedding_dim={int(value)}"]
    return [*common, f"sparsity={method}", f"sparsity.density={value}",
            *(o for name in lever for o in LEVERS[name])]


def run_name(model: str, setting: str, lr: float, epochs: int | None) -> str:
    """`<model>-<setting>-lr<lr>`, and `-e<epochs>` when not the experiment config's."""
    return f"{model}-{setting.replace(':', '-')}-lr{lr:g}" + (f"-e{epochs}" if epochs else "")


def active_params(result: dict[str, Any]) -> tuple[int, int]:
    """The run's model dimension and its weights, sparsified ones at their final density (a
    run without updates, a static control, logs none: then the nominal density, which the
    exact budget holds)."""
    cfg = job_config(result["overrides"])
    shapes, sparsity = parameter_counts(cfg), cfg.sparsity
    patterns = sparsity.dense_parameters if isinstance(sparsity, UnstructuredConfig) else []
    density = result["final_density"] or ({} if not isinstance(sparsity, DropAndGrowConfig) else {
        name: sparsity.density for name in shapes  # tables' names have no dot, layers' do
        if ("." not in name and name in (sparsity.tables or [name]))
        or any(fnmatch.fnmatchcase(name, p) for p in patterns)})
    return cfg.model.embedding_dim, round(sum(rows * cols * density.get(name, 1.0)
                                              for name, (rows, cols) in shapes.items()))


def row_of(data: str, result: dict[str, Any]) -> dict[str, Any]:
    """A run's row: its identity, size and the figures of its best validation epoch."""
    name, tuned = result["name"].split("-lr")
    model, method, value, *variant = name.split("-")
    dim, params = active_params(result)
    best = result["best"]
    return {"data": data, "model": model, "method": METHOD[method],
            "variant": "+".join(variant) or None,
            "density": 1.0 if method == "dense" else float(value),
            "embedding_dim": dim, "params": params,
            "recall@20": best["recall@20"], "ndcg@20": best["ndcg@20"],
            "valid_recall@20": best["valid_recall@20"], "epochs": result["epochs"],
            "best_epoch": best["epoch"], "lr": float(tuned.split("-e")[0]),
            "train_minutes": round(result["wall_seconds"] / 60, 1)}


def chosen_rows() -> list[dict[str, Any]]:
    """Of every (model, method, density, dimension), the run with the best validation
    Recall@20 over the learning rates and epoch budgets tried (a longer run's curve holds a
    shorter one's best epochs too, chosen on validation all the same)."""
    best: dict[tuple, dict[str, Any]] = {}
    for path in sorted(RUNS.glob("*/*.json")):
        row = row_of(path.parent.name, json.loads(path.read_text()))
        key = (row["data"], row["model"], row["method"], row["variant"], row["density"],
               row["embedding_dim"])
        lrs, epochs = (best.get(key, {}).get(f, []) for f in ("lrs_tried", "epochs_tried"))
        if key not in best or row["valid_recall@20"] > best[key]["valid_recall@20"]:
            best[key] = row
        best[key]["lrs_tried"] = sorted({*lrs, row["lr"]})
        best[key]["epochs_tried"] = sorted({*epochs, row["epochs"]})
    return sorted(best.values(), key=lambda r: (r["data"], r["model"], -r["params"],
                                                 r["method"], r["variant"] or ""))


def write_table(rows: list[dict[str, Any]]) -> None:
    (RESULTS / "equal_budget.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = ["# DSL against the dense model of the same size (tuned on validation)", "",
             f"Written by `benchmarks/equal_budget.py`: 2 CPU ranks; gowalla's train is its "
             f"train split less {VALID_FRACTION:.0%} of each user's interactions (the "
             "validation split), lastfm's validation split is its own; every run's epoch and "
             "learning rate are chosen by validation Recall@20, and the test figures are those "
             "of that choice.", "",
             "| data | model | method | density | dim | params | test Recall@20 | test NDCG@20 "
             "| valid Recall@20 | best epoch / epochs (of tried) | lr (of tried) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        method = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        lines.append(f"| {r['data']} | {r['model']} | {method} | {r['density']:g} | "
                     f"{r['embedding_dim']} | {r['params'] / 1e6:.2f}M | {r['recall@20']:.4f} | "
                     f"{r['ndcg@20']:.4f} | {r['valid_recall@20']:.4f} | "
                     f"{r['best_epoch']} / {r['epochs']} "
                     f"({', '.join(map(str, r['epochs_tried']))}) | "
                     f"{r['lr']:g} ({', '.join(f'{x:g}' for x in r['lrs_tried'])}) |")
    (RESULTS / "equal_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="gowalla", choices=sorted(DATA))
    parser.add_argument("--models", nargs="+", default=["mf", "lightgcn"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--lrs", nargs="+", type=float, required="--table-only" not in argv)
    parser.add_argument("--epochs", type=int, help="default: the experiment config's")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.table_only:
        runs = RUNS / args.data
        for model in args.models:
            for setting in args.settings:
                for lr in args.lrs:
                    name = run_name(model, setting, lr, args.epochs)
                    if (runs / f"{name}.json").exists() and not args.rerun:
                        continue
                    run_benchmark(name, overrides(args.data, model, setting, lr, args.epochs,
                                                  args.eval_every), results=runs)
    write_table(chosen_rows())


if __name__ == "__main__":
    main(sys.argv[1:])
