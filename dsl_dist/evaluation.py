"""Full-ranking evaluation: every user with test items is scored against all items.

Users are split across ranks (user % world_size); the model computes what it needs about all
items once (`Recommender.item_side`, through the sharded tables). Each rank then takes its users
a batch at a time (their side, `Recommender.user_side`, looked up once per batch), scores them
against one block of items after another with their training items excluded, and keeps a
running top-K, so that memory holds a batch × block of scores whatever the catalogue's size:
`eval.memory_mb` sizes both. The per-user sums are all-reduced, so every rank ends with the
same metrics. With `eval.max_users`, a sample of the users (by a hash of their id) is scored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel

from dsl_dist.data.stream import UserItems, history_batch, read_user_items
from dsl_dist.distributed import DistContext
from dsl_dist.model.base import Recommender
from dsl_dist.sparsity.selection.hashing import uniform_hash

ITEM_BLOCK = 1 << 16
"""Items scored at once (at most)."""
BYTES_PER_SCORE = 16
"""Memory per (user, item) score of a block: the score, its copy in the top-K merge, masks."""


def _metric_sums(hits: torch.Tensor, num_relevant: torch.Tensor,
                 ks: list[int]) -> dict[str, torch.Tensor]:
    """Recall@K and NDCG@K summed over users, from hits (users, max K) of the ranked items."""
    discounts = 1.0 / torch.log2(torch.arange(2, max(ks) + 2, dtype=torch.float64))
    ideal = torch.cumsum(discounts, 0)
    sums: dict[str, torch.Tensor] = {}
    for k in ks:
        sums[f"recall@{k}"] = (hits[:, :k].sum(1) / num_relevant).sum()
        idcg = ideal[(num_relevant.clamp(max=k) - 1).long()]
        sums[f"ndcg@{k}"] = ((hits[:, :k] * discounts[:k]).sum(1) / idcg).sum()
    return sums


def ranking_metrics(scores: torch.Tensor, relevant: torch.Tensor,
                    ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user Recall@K and NDCG@K sums for a batch.

    scores: (users, items) with excluded items at -inf; relevant: (users, items) bool.
    Recall@K = hits in top K / |relevant| (LightGCN's definition); NDCG@K uses binary gains
    and the ideal DCG of min(K, |relevant|) hits.
    """
    top = scores.topk(max(ks), dim=1).indices
    hits = relevant.gather(1, top).to(torch.float64)
    return _metric_sums(hits, relevant.sum(1).to(torch.float64), ks)


def items_matrix(users: np.ndarray, source: UserItems, num_items: int) -> torch.Tensor:
    """A (len(users), num_items) bool matrix of `source`'s items for each of `users`."""
    counts, items = source.gather(users)
    mask = torch.zeros(len(users), num_items, dtype=torch.bool)
    mask[torch.from_numpy(np.repeat(np.arange(len(users)), counts)), torch.from_numpy(items)] = True
    return mask


def sampled_users(users: np.ndarray, max_users: Optional[int], seed: int,
                  ctx: DistContext) -> np.ndarray:
    """This rank's users, or of all ranks' about `max_users` by a hash of their id."""
    total = int(ctx.all_reduce_sum(torch.tensor([len(users)])))
    if max_users is None or max_users >= total:
        return users
    keep = uniform_hash(torch.from_numpy(users.astype(np.int64)), seed) < max_users / total
    return users[keep.numpy()]


def _top_items(recommender: Recommender, items: object, side: object, seen: UserItems,
               users: np.ndarray, num_items: int, k: int, block: int
               ) -> torch.Tensor:
    """(len(users), k) items of highest score, the users' training items excluded."""
    counts, excluded = seen.gather(users)
    rows = torch.from_numpy(np.repeat(np.arange(len(users)), counts))
    excluded = torch.from_numpy(excluded)
    top_scores = torch.full((len(users), 0), -torch.inf)
    top_items = torch.zeros((len(users), 0), dtype=torch.int64)
    for start in range(0, num_items, block):
        stop = min(start + block, num_items)
        scores = recommender.score(items, side, start, stop).cpu().float()
        here = (excluded >= start) & (excluded < stop)
        scores[rows[here], excluded[here] - start] = -torch.inf
        merged = torch.cat([top_scores, scores], 1)
        candidates = torch.cat([top_items, torch.arange(start, stop).expand(len(users), -1)], 1)
        top_scores, where = merged.topk(min(k, merged.shape[1]), dim=1)
        top_items = candidates.gather(1, where)
    return top_items


@torch.no_grad()
def evaluate(model: DistributedModelParallel, dataset_dir: Path, split: str, num_items: int,
             ks: list[int], ctx: DistContext, memory_mb: int = 256,
             max_users: Optional[int] = None, seed: int = 0) -> dict[str, float]:
    """Recall@K and NDCG@K over the users with items in `split` (or a sample of about
    `max_users` of them), averaged over users; "users" is how many were scored."""
    was_training = model.training
    model.eval()
    recommender: Recommender = model.module
    block = min(num_items, ITEM_BLOCK)
    user_batch = max(1, (memory_mb << 20) // (BYTES_PER_SCORE * block))
    items = recommender.item_side(ctx.device, block)
    targets = read_user_items(dataset_dir, split, rank=ctx.rank, world_size=ctx.world_size)
    users = sampled_users(targets.users, max_users, seed, ctx)
    seen = read_user_items(dataset_dir, "train", rank=ctx.rank, world_size=ctx.world_size,
                           only=users)  # the scored users' train items: what scoring excludes
    num_batches = ctx.all_reduce_max(math.ceil(len(users) / user_batch))
    sums = {name: torch.zeros((), dtype=torch.float64)
            for k in ks for name in (f"recall@{k}", f"ndcg@{k}")}
    for b in range(num_batches):
        batch = users[b * user_batch:(b + 1) * user_batch]
        # Every rank must make the same number of lookups: an exhausted rank scores user 0.
        ids = batch if len(batch) else np.zeros(1, dtype=np.int64)
        side = recommender.user_side(items, torch.from_numpy(ids).to(ctx.device),
                                     history_batch(seen, ids).to(ctx.device))
        if not len(batch):
            continue
        top = _top_items(recommender, items, side, seen, batch, num_items, max(ks), block)
        counts, relevant = targets.gather(batch)
        keys = np.repeat(np.arange(len(batch)), counts) * num_items + relevant
        local = torch.arange(len(batch))[:, None] * num_items + top
        hits = torch.from_numpy(np.isin(local.numpy(), keys)).to(torch.float64)
        for name, value in _metric_sums(hits, torch.from_numpy(counts).to(torch.float64),
                                        ks).items():
            sums[name] += value
    names = sorted(sums)
    totals = ctx.all_reduce_sum(torch.stack([sums[n] for n in names] +
                                            [torch.tensor(float(len(users)), dtype=torch.float64)]))
    model.train(was_training)
    return {**{name: float(totals[i] / totals[-1]) for i, name in enumerate(names)},
            "users": int(totals[-1])}
