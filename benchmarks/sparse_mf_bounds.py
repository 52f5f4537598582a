"""Reference points for DSL's quality target: what BPR-MF reaches at a weight budget when the
sparse model is cut from a *dense-trained* one, which sparse-from-scratch training is hoped to
match (Zhu & Gupta 2017; RigL's comparisons).

    python benchmarks/sparse_mf_bounds.py [--data data/gowalla] [--density 0.2] [--epochs 30]
                                          [--split valid] [--runs prefix --width-alpha 0 0.5]

One process, plain PyTorch tables (no TorchRec, no sharding), the MF benchmark's settings
(`configs/experiment/mf_gowalla.yaml`: dim 64, row-wise Adagrad lr 0.05, init std 0.01, L2 1e-4,
30 epochs; 4096 samples per step, the 2 ranks × 2048 of the benchmark) and the product's
full-ranking metrics. Runs, each printed and written to benchmarks/results/NAME.json:

- `dense`: calibration against `mf_gowalla_dense.json` (the sharded trainer);
- `dense_small`: a dense MF of dimension round(density × 64), the same number of weights;
- `static`: a random mask at the density, never changed (sparse from scratch without drop-and-grow);
- `one_shot`: dense for `--prune-epoch` epochs, then the `density` largest |w| over both tables
  are kept and the rest of the run trains with that mask;
- `gradual`: gradual magnitude pruning: the density falls from 1 to `density` on a cubic
  schedule from epoch 1 to `--gradual-end`, pruning by global |w|, then trains with the mask;
- `prefix`: a static mask where every row is a prefix of the columns, of a width proportional
  to (the row's train interactions + 1) ** alpha for each `--width-alpha` (0: every row about
  density × 64 wide; larger: popular rows wider, as Mixed-Dimension Embeddings allocate).

`--split valid` evaluates a prepared data set's validation split instead of test (for choosing
settings without looking at test).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from dsl_dist.data.errors import DataError
from dsl_dist.data.graph import InteractionGraph, read_graph
from dsl_dist.data.stream import UserItems, read_user_items
from dsl_dist.evaluation import items_matrix, ranking_metrics
from dsl_dist.model.mf import bpr_loss

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = ("dense", "dense_small", "static", "one_shot", "gradual", "prefix")
STEP_SAMPLES = 4096
EPS = 1e-8
PRUNE_EVERY = 150
"""Steps between gradual pruning steps: the DSL benchmark's delta_t."""


Data = tuple[InteractionGraph, UserItems, UserItems]
"""The train pairs, and the train and test items per user."""


def read_data(directory: Path, split: str) -> Data:
    return (read_graph(directory), read_user_items(directory, "train", rank=0, world_size=1),
            read_user_items(directory, split, rank=0, world_size=1))


def prefix_mask(graph: InteractionGraph, dim: int, alpha: float, count: int) -> torch.Tensor:
    """`count` weights of both tables (flat: user rows, then item rows) where every row is a
    prefix of the columns, of width proportional to (interactions + 1)**alpha: the weights of
    smallest (column + 0.5) / (interactions + 1)**alpha."""
    columns = torch.arange(dim, dtype=torch.float64) + 0.5
    scores = torch.cat([
        (columns[None, :] / torch.from_numpy(
            (np.bincount(ids, minlength=rows) + 1.0) ** alpha)[:, None]).flatten()
        for ids, rows in ((graph.users, graph.num_users), (graph.items, graph.num_items))])
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[scores.topk(count, largest=False).indices] = True
    return keep


class SparseMF:
    """BPR-MF with row-wise Adagrad and an optional mask over both tables (pruned weights are
    zeroed after every step)."""

    def __init__(self, num_users: int, num_items: int, dim: int, args: argparse.Namespace,
                 generator: torch.Generator) -> None:
        self.tables = [torch.randn(n, dim, generator=generator) * args.init_std
                       for n in (num_users, num_items)]
        self.sums = [torch.zeros(n) for n in (num_users, num_items)]
        self.masks: Optional[list[torch.Tensor]] = None
        self.lr, self.l2 = args.lr, args.l2_reg

    @property
    def num_weights(self) -> int:
        return sum(t.numel() for t in self.tables)

    def keep_largest(self, count: int) -> None:
        """Masks all but the `count` weights of largest |w| over both tables (masked weights are
        0, so they stay masked while `count` does not grow)."""
        flat = torch.cat([t.flatten() for t in self.tables]).abs()
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[flat.topk(count).indices] = True
        self.set_mask(keep)

    def set_mask(self, flat: torch.Tensor) -> None:
        sizes = [t.numel() for t in self.tables]
        self.masks = [m.view_as(t) for m, t in zip(flat.split(sizes), self.tables)]
        for table, mask in zip(self.tables, self.masks):
            table.mul_(mask)

    def step(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> float:
        u, p, n = (self.tables[t][ids].requires_grad_() for t, ids in
                   ((0, users), (1, positives), (1, negatives)))
        loss = bpr_loss(u, p, n.unsqueeze(1), self.l2)
        loss.backward()
        with torch.no_grad():
            self._adagrad(0, users, u.grad)
            self._adagrad(1, torch.cat([positives, negatives]), torch.cat([p.grad, n.grad]))
        return float(loss.detach())

    def _adagrad(self, t: int, ids: torch.Tensor, grad: torch.Tensor) -> None:
        rows, inverse = torch.unique(ids, return_inverse=True)
        g = torch.zeros(len(rows), grad.shape[1]).index_add_(0, inverse, grad)
        self.sums[t][rows] += g.pow(2).mean(1)
        update = self.tables[t][rows] - self.lr * g / (self.sums[t][rows].sqrt() + EPS)[:, None]
        if self.masks is not None:
            update *= self.masks[t][rows]
        self.tables[t][rows] = update


def train(name: str, dim: int, args: argparse.Namespace, data: Data,
          before_step: Callable[[SparseMF, int, int], None]) -> dict:
    """Trains one MF for args.epochs; `before_step(model, step, steps_per_epoch)` may change
    its mask. Evaluates every 5 epochs and at the end."""
    graph, seen, targets = data
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = SparseMF(graph.num_users, graph.num_items, dim, args, generator)
    steps_per_epoch = math.ceil(len(graph.users) / STEP_SAMPLES)
    curve, started, step = [], time.perf_counter(), 0
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(graph.users))
        for start in range(0, len(order), STEP_SAMPLES):
            rows = order[start:start + STEP_SAMPLES]
            before_step(model, step, steps_per_epoch)
            negatives = rng.integers(0, graph.num_items, len(rows))
            loss = model.step(*map(torch.from_numpy,
                                   (graph.users[rows], graph.items[rows], negatives)))
            step += 1
        if epoch % 5 == 0 or epoch == args.epochs:
            metrics = evaluate(model, seen, targets, graph.num_items)
            curve.append({"epoch": epoch, "loss": loss, **metrics})
            print(f"{name} epoch {epoch} loss {loss:.4f} recall@20 {metrics['recall@20']:.4f}",
                  flush=True)
    masks = model.masks
    return {"name": name, "dim": dim,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "weights": model.num_weights,
            "active": int(sum(m.sum() for m in masks)) if masks else model.num_weights,
            "density": ({t: float(m.float().mean()) for t, m in zip(("user", "item"), masks)}
                        if masks else None),
            "final_metrics": {k: curve[-1][k] for k in ("recall@20", "ndcg@20")},
            "learning_curve": curve, "seconds": time.perf_counter() - started}


@torch.no_grad()
def evaluate(model: SparseMF, seen: UserItems, targets: UserItems, num_items: int,
             batch: int = 4096) -> dict[str, float]:
    """Full-ranking Recall@20 and NDCG@20 over the users of `targets`, `seen` items excluded."""
    sums = {"recall@20": 0.0, "ndcg@20": 0.0}
    for start in range(0, len(targets.users), batch):
        users = targets.users[start:start + batch]
        scores = model.tables[0][torch.from_numpy(users)] @ model.tables[1].T
        scores[items_matrix(users, seen, num_items)] = -torch.inf
        for k, v in ranking_metrics(scores, items_matrix(users, targets, num_items), [20]).items():
            sums[k] += float(v)
    return {k: v / len(targets.users) for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/gowalla"),
                        help="a prepared data set (relative paths are from the repository)")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--prune-epoch", type=int, default=10)
    parser.add_argument("--gradual-end", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--init-std", type=float, default=0.01)
    parser.add_argument("--l2-reg", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width-alpha", nargs="+", type=float, default=[0.0, 0.25, 0.5],
                        help="the prefix runs' popularity exponents")
    parser.add_argument("--split", choices=("test", "valid"), default="test",
                        help="the split evaluated")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS[:-1]))
    args = parser.parse_args()
    if not 0 < args.density <= 1:
        parser.error(f"--density {args.density}: must be in (0, 1]")
    if not 1 <= args.prune_epoch < args.epochs or not 1 < args.gradual_end < args.epochs:
        parser.error("--prune-epoch and --gradual-end must fall inside the run (1 to --epochs - 1,"
                     " gradual end after epoch 1)")
    try:
        data = read_data(REPO / args.data, args.split)
    except DataError as error:
        parser.error(str(error))
    dim, d = 64, args.density

    def nothing(model: SparseMF, step: int, per_epoch: int) -> None:
        pass

    def static(model: SparseMF, step: int, per_epoch: int) -> None:
        if step == 0:
            keep = torch.zeros(model.num_weights, dtype=torch.bool)
            seeded = torch.Generator().manual_seed(args.seed)
            order = torch.randperm(model.num_weights, generator=seeded)
            keep[order[:round(d * model.num_weights)]] = True
            model.set_mask(keep)

    def one_shot(model: SparseMF, step: int, per_epoch: int) -> None:
        if step == args.prune_epoch * per_epoch:
            model.keep_largest(round(d * model.num_weights))

    def gradual(model: SparseMF, step: int, per_epoch: int) -> None:
        start, end = per_epoch, args.gradual_end * per_epoch
        if start <= step <= end and (step - start) % PRUNE_EVERY == 0:
            remaining = 1 - (step - start) / (end - start)
            model.keep_largest(round((d + (1 - d) * remaining ** 3) * model.num_weights))

    def prefix(alpha: float) -> Callable[[SparseMF, int, int], None]:
        def set_prefix(model: SparseMF, step: int, per_epoch: int) -> None:
            if step == 0:
                model.set_mask(prefix_mask(data[0], dim, alpha, round(d * model.num_weights)))
        return set_prefix

    runs = {"dense": (dim, nothing), "dense_small": (round(d * dim), nothing),
            "static": (dim, static), "one_shot": (dim, one_shot), "gradual": (dim, gradual),
            **{f"prefix_a{alpha:g}": (dim, prefix(alpha)) for alpha in args.width_alpha}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for run in (r for name in args.runs for r in runs if r.split("_a")[0] == name):
        run_dim, hook = runs[run]
        result = train(run, run_dim, args, data, hook)
        path = RESULTS / f"bounds_mf_{args.data.name}_d{d}_{run}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{run}: recall@20 {result['final_metrics']['recall@20']:.4f} -> {path}")


if __name__ == "__main__":
    main()
