"""The paper's grid: data set × model × density, each a torchrun job, and one table of results.

    python benchmarks/reproduce.py [--data gowalla lastfm] [--models mf lightgcn neumf multvae]
                                   [--densities dense 0.5 0.2 0.1] [--equal-budget]
                                   [--rerun] [--table-only]

Every (data, model) runs the settings of `configs/experiment/<model>_<data>.yaml` (dense), or
those plus `sparsity=dsl sparsity.density=D` and the paper's DSL settings for the model, which
the same file holds. Each run writes benchmarks/results/reproduce/<data>-<model>-<density>.json
(train_benchmark.py's figures) and is skipped when that file exists unless --rerun; then the
whole table is written to benchmarks/results/reproduction.{md,json}. With --equal-budget it
also runs, for MF and LightGCN, the dense models of the same size as each density's budget:
embedding dimension density × 64 rounded down and up to a multiple of 4 (FBGEMM's kernels),
e.g. 12 and 16 for 0.2 (`<data>-<model>-dim<D>.json`); the table shows them beside the sparse
row. These runs use the same settings and epochs as the grid, selected on nothing (as the
grid); benchmarks/equal_budget.py is the tuned comparison on a validation split. The table's
figure (Recall@20 against density, a line per data set and model, the dense runs and the
equal-budget dense models marked) goes to benchmarks/results/reproduction.png.

FLOPs (multiply-adds × 2; estimates, formulas in `flops` below): a multiply-add is counted
when its weight operand is active (RigL's convention), so a masked tensor of density ρ costs ρ
times its dense cost; of a dot product between two embeddings the user-side one counts as the
weight operand. Training FLOPs per example are 3 × forward (forward, and backward for
activations and weights); an example is a positive with its negatives (MF, LightGCN, NeuMF) or
a user (Mult-VAE). Inference FLOPs rank one user against all items.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


from train_benchmark import RESULTS, run_benchmark

from dsl_dist.report.plots import density_grid

RUNS = RESULTS / "reproduce"
DATA = ("gowalla", "lastfm")
MODELS = ("mf", "lightgcn", "neumf", "multvae")
DENSITIES = ("dense", "0.5", "0.2", "0.1")
FULL_DIM = 64
EQUAL_BUDGET_MODELS = ("mf", "lightgcn")  # a dense model of another embedding dimension
PUBLISHED = {
    # Same gowalla split (LightGCN's): NGCF paper (MF, NeuMF; its NDCG is normalised
    # differently, so not quoted) and LightGCN paper (Mult-VAE, LightGCN; same NDCG as ours).
    ("gowalla", "mf"): {"recall@20": 0.1291, "source": "NGCF (Wang et al., 2019)"},
    ("gowalla", "neumf"): {"recall@20": 0.1399, "source": "NGCF (Wang et al., 2019)"},
    ("gowalla", "multvae"): {"recall@20": 0.1641, "ndcg@20": 0.1335,
                             "source": "LightGCN (He et al., 2020)"},
    ("gowalla", "lightgcn"): {"recall@20": 0.1830, "ndcg@20": 0.1554,
                              "source": "LightGCN (He et al., 2020)"},
}


def job_config(overrides: list[str]) -> Any:
    from dsl_dist.config.compose import compose_job

    return compose_job(overrides)


def overrides_of(data: str, model: str, density: str) -> list[str]:
    base = [f"+experiment={model}_{data}"]
    return base if density == "dense" else [*base, "sparsity=dsl", f"sparsity.density={density}"]


def equal_budget_dims(density: str) -> list[int]:
    """The embedding dimensions, multiples of 4, just below and above density × 64."""
    exact = float(density) * FULL_DIM
    return sorted({max(4, int(exact // 4) * 4), max(4, -int(-exact // 4) * 4)})


def equal_budget_runs(data: str, model: str, density: str) -> list[tuple[int, float]]:
    """(dimension, Recall@20) of the dense models run of the same size as the density's
    budget."""
    if density == "dense" or model not in EQUAL_BUDGET_MODELS:
        return []
    paths = [(dim, RUNS / f"{data}-{model}-dim{dim}.json") for dim in equal_budget_dims(density)]
    return [(dim, json.loads(path.read_text())["final_metrics"]["recall@20"])
            for dim, path in paths if path.exists()]


def equal_budget_recall(data: str, model: str, density: str) -> str:
    """'R@20 (dim D)' of the dense models of the same size as the density's budget."""
    return " / ".join(f"{recall:.4f} (dim {dim})"
                      for dim, recall in equal_budget_runs(data, model, density)) or "–"


def equal_budget_references() -> list[dict[str, Any]]:
    """The equal-budget dense runs as points of the grid's figure (density: D / 64)."""
    return [{"data": data, "model": model, "density": dim / FULL_DIM, "recall@20": recall}
            for data in DATA for model in EQUAL_BUDGET_MODELS for density in DENSITIES
            for dim, recall in equal_budget_runs(data, model, density)]


def parameter_counts(cfg: Any) -> dict[str, tuple[int, int]]:
    """(rows, cols) of every table and dense parameter of the model (built on meta)."""
    from dsl_dist.data.manifest import Manifest
    from dsl_dist.model.registry import build_model
    from dsl_dist.model.sharding import embedding_tables

    model = build_model(cfg, Manifest.load(Path(cfg.data.path)), Path(cfg.data.path))
    shapes = {t.name: (t.num_embeddings, t.embedding_dim) for t in embedding_tables(model)}
    for name, p in model.named_parameters():
        if "embedding_bags" not in name:
            shapes[name] = (p.shape[0], p[0].numel())
    return shapes


def flops(cfg: Any, shapes: dict[str, tuple[int, int]], density: dict[str, float],
          world_size: int) -> tuple[float, float]:
    """(training FLOPs per example, inference FLOPs per user) for the model of `cfg` whose
    tensors have the given densities (1 where absent)."""
    from dsl_dist.data.manifest import Manifest

    def rho(name: str) -> float:
        return density.get(name, 1.0)

    def linear(name: str) -> float:  # a dense layer applied to one input
        rows, cols = shapes[f"{name}.weight"]
        return 2 * rows * cols * rho(f"{name}.weight")

    m, negatives = cfg.model, cfg.data.num_negatives
    manifest = Manifest.load(Path(cfg.data.path))
    users, items, d = manifest.num_users, manifest.num_items, m.embedding_dim
    if m.name == "mf":
        score = 2 * d * rho("user")
        return 3 * (1 + negatives) * score, items * score
    if m.name == "lightgcn":  # final embeddings are sums of rows: dense
        train, per_user = _lightgcn_propagation(cfg, d, rho, users, world_size)
        return 3 * (train + (1 + negatives) * 2 * d), per_user + items * 2 * d
    if m.name == "neumf":
        pair = (m.neumf.gmf_dim * rho("user_gmf") + linear("predict")
                + sum(linear(f"tower.{k}") for k in range(len(m.neumf.mlp_layers))))
        return 3 * (1 + negatives) * pair, items * pair
    history = manifest.split("train").rows / users
    forward = (2 * d * history * rho("item_encoder") + linear("encode") + linear("decode")
               + 2 * d * items * rho("item_decoder"))
    return 3 * forward, forward


def _lightgcn_propagation(cfg: Any, d: int, rho: Any, users: int,
                          world_size: int) -> tuple[float, float]:
    """Forward FLOPs of LightGCN's propagation per training example (of its user and its
    1 + negatives items) and per user ranked (item embeddings are computed once per
    evaluation and shared by all users)."""
    from dsl_dist.data.graph import load_propagation_bags, read_graph

    g, path, negatives = cfg.model.lightgcn, Path(cfg.data.path), cfg.data.num_negatives
    if g.propagation == "bags":  # a node's own row and its two bags of rows, weighted sums
        bags = load_propagation_bags(path, g.num_layers, g.max_neighbours)
        node = {side: 2 * d * (rho(side) + sum(
            rho(table) * float(getattr(bags, f"{side}_to_{table}s").lengths().float().mean())
            for table in ("user", "item"))) for side in ("user", "item")}
        items = bags.item_to_items.num_rows
        return node["user"] + (1 + negatives) * node["item"], node["user"] + items * node[
            "item"] / users
    # every step, K products with Â (2·edges nonzeros) over all nodes, the first on the masked
    # tables; shared by the global batch
    nonzeros = 2 * len(read_graph(path).users)
    per_step = 2 * nonzeros * d * ((rho("user") + rho("item")) / 2 + g.num_layers - 1)
    return per_step / (cfg.data.batch_size * world_size), per_step / users


def summarise(data: str, model: str, density: str) -> dict[str, Any] | None:
    path = RUNS / f"{data}-{model}-{density}.json"
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    cfg = job_config(overrides_of(data, model, density))
    shapes = parameter_counts(cfg)
    sizes = {name: rows * cols for name, (rows, cols) in shapes.items()}
    final_density = run["final_density"] or {}
    active = sum(size * final_density.get(name, 1.0) for name, size in sizes.items())
    train_flops, inference_flops = flops(cfg, shapes, final_density, run["world_size"])
    return {"data": data, "model": model, "density": density,
            **run["final_metrics"], "parameters": sum(sizes.values()), "active": round(active),
            "train_flops_per_example": train_flops, "inference_flops_per_user": inference_flops,
            "epochs": run["epochs"], "train_minutes": run["seconds_per_epoch"] * run["epochs"] / 60,
            "peak_rss_mb": max(run["peak_rss_mb_per_rank"]),
            "equal_budget_dense": equal_budget_recall(data, model, density),
            "published": PUBLISHED.get((data, model))}


def write_table(rows: list[dict[str, Any]]) -> None:
    dense = {(r["data"], r["model"]): r for r in rows if r["density"] == "dense"}
    lines = ["# Reproduction: data set × model × density",
             "",
             "Written by `benchmarks/reproduce.py` from `benchmarks/results/reproduce/*.json` "
             "(2 CPU ranks, gloo). FLOPs per the formulas in the script's docstring; "
             "'vs dense' is Recall@20 relative to the same model's dense run; 'equal-budget "
             "dense' is the Recall@20 of dense models with about as many parameters as the "
             "row's budget (embedding dimension density × 64 rounded to multiples of 4), "
             "same settings and epochs.",
             "",
             "| data | model | density | Recall@20 | NDCG@20 | vs dense | equal-budget dense | "
             "active / all params | "
             "train GFLOPs/example | inference GFLOPs/user | epochs | train min | peak RSS MB | "
             "published Recall@20 / NDCG@20 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = dense.get((r["data"], r["model"]))
        versus = f"{r['recall@20'] / base['recall@20']:.1%}" if base else "–"
        published = r["published"] or {}
        quoted = " / ".join(f"{published[k]:.4f}" for k in ("recall@20", "ndcg@20") if k in published)
        lines.append(
            f"| {r['data']} | {r['model']} | {r['density']} | {r['recall@20']:.4f} | "
            f"{r['ndcg@20']:.4f} | {versus} | {r['equal_budget_dense']} | "
            f"{r['active'] / 1e6:.2f}M / {r['parameters'] / 1e6:.2f}M | "
            f"{r['train_flops_per_example'] / 1e9:.2e} | {r['inference_flops_per_user'] / 1e9:.3f} | "
            f"{r['epochs']} | {r['train_minutes']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{quoted + ' (' + published['source'] + ')' if quoted else '–'} |")
    (RESULTS / "reproduction.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "reproduction.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=DATA)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--densities", nargs="+", default=list(DENSITIES), choices=DENSITIES)
    parser.add_argument("--equal-budget", action="store_true",
                        help="also run the dense models of each density's size (MF, LightGCN)")
    parser.add_argument("--rerun", action="store_true", help="run again where results exist")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table")
    args = parser.parse_args(argv)
    if not args.table_only:
        for data in args.data:
            for model in args.models:
                for density in args.densities:
                    name = f"{data}-{model}-{density}"
                    if args.rerun or not (RUNS / f"{name}.json").exists():
                        run_benchmark(name, overrides_of(data, model, density), RUNS)
                    if not args.equal_budget or density == "dense" or \
                            model not in EQUAL_BUDGET_MODELS:
                        continue
                    for dim in equal_budget_dims(density):
                        name = f"{data}-{model}-dim{dim}"
                        if args.rerun or not (RUNS / f"{name}.json").exists():
                            run_benchmark(name, [*overrides_of(data, model, "dense"),
                                                 f"model.embedding_dim={dim}"], RUNS)
    rows = [row for data in DATA for model in MODELS for density in DENSITIES
            if (row := summarise(data, model, density))]
    write_table(rows)
    density_grid(rows, equal_budget_references(), RESULTS / "reproduction.png")


if __name__ == "__main__":
    main(sys.argv[1:])
