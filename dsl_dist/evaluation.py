"""Full-ranking evaluation: every user with test items is scored against all items.

Users are split across ranks (user % world_size); the model computes what it needs about all
items once (`Recommender.item_side`, through the sharded tables), then each rank scores its
users in batches with their training items excluded, and the per-user sums are all-reduced, so
every rank ends with the same metrics.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel

from dsl_dist.data.stream import UserItems, history_batch, read_user_items
from dsl_dist.distributed import DistContext
from dsl_dist.model.base import Recommender


def ranking_metrics(scores: torch.Tensor, relevant: torch.Tensor,
                    ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user Recall@K and NDCG@K sums for a batch.

    scores: (users, items) with excluded items at -inf; relevant: (users, items) bool.
    Recall@K = hits in top K / |relevant| (LightGCN's definition); NDCG@K uses binary gains
    and the ideal DCG of min(K, |relevant|) hits.
    """
    top = scores.topk(max(ks), dim=1).indices
    hits = relevant.gather(1, top).to(torch.float64)
    num_relevant = relevant.sum(1).to(torch.float64)
    discounts = 1.0 / torch.log2(torch.arange(2, max(ks) + 2, dtype=torch.float64))
    ideal = torch.cumsum(discounts, 0)
    sums: dict[str, torch.Tensor] = {}
    for k in ks:
        sums[f"recall@{k}"] = (hits[:, :k].sum(1) / num_relevant).sum()
        idcg = ideal[(num_relevant.clamp(max=k) - 1).long()]
        sums[f"ndcg@{k}"] = ((hits[:, :k] * discounts[:k]).sum(1) / idcg).sum()
    return sums


def items_matrix(users: np.ndarray, source: UserItems, num_items: int) -> torch.Tensor:
    """A (len(users), num_items) bool matrix of `source`'s items for each of `users`."""
    counts, items = source.gather(users)
    mask = torch.zeros(len(users), num_items, dtype=torch.bool)
    mask[torch.from_numpy(np.repeat(np.arange(len(users)), counts)), torch.from_numpy(items)] = True
    return mask


@torch.no_grad()
def evaluate(model: DistributedModelParallel, dataset_dir: Path, split: str, num_items: int,
             ks: list[int], user_batch: int, ctx: DistContext) -> dict[str, float]:
    """Recall@K and NDCG@K over the users with items in `split`, averaged over users."""
    was_training = model.training
    model.eval()
    recommender: Recommender = model.module
    items = recommender.item_side(ctx.device, user_batch)
    targets = read_user_items(dataset_dir, split, rank=ctx.rank, world_size=ctx.world_size)
    seen = read_user_items(dataset_dir, "train", rank=ctx.rank, world_size=ctx.world_size)
    num_batches = ctx.all_reduce_max(math.ceil(len(targets.users) / user_batch))
    sums = {name: torch.zeros((), dtype=torch.float64)
            for k in ks for name in (f"recall@{k}", f"ndcg@{k}")}
    for b in range(num_batches):
        users = targets.users[b * user_batch:(b + 1) * user_batch]
        # Every rank must make the same number of lookups: an exhausted rank scores user 0.
        ids = users if len(users) else np.zeros(1, dtype=np.int64)
        history = history_batch(seen, ids).to(ctx.device)
        scores = recommender.score(items, torch.from_numpy(ids).to(ctx.device), history).cpu()
        if not len(users):
            continue
        scores[items_matrix(users, seen, num_items)] = -torch.inf
        relevant = items_matrix(users, targets, num_items)
        for name, value in ranking_metrics(scores, relevant, ks).items():
            sums[name] += value
    names = sorted(sums)
    totals = ctx.all_reduce_sum(torch.stack([sums[n] for n in names] +
                                            [torch.tensor(float(len(targets.users)), dtype=torch.float64)]))
    model.train(was_training)
    return {name: float(totals[i] / totals[-1]) for i, name in enumerate(names)}
