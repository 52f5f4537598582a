"""Full-ranking evaluation: every user with test items is scored against all items.

Users are split across ranks (user % world_size); each rank looks up the whole item matrix
through the sharded model, scores its users in batches with their training items excluded, and
the per-user sums are all-reduced, so every rank ends with the same metrics.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from dsl_dist.data.stream import ITEM_FEATURE, USER_FEATURE, UserItems, read_user_items
from dsl_dist.distributed import DistContext


def lookup(model: nn.Module, feature_names: list[str], feature: str, ids: torch.Tensor,
           device: torch.device) -> torch.Tensor:
    """Embeddings (len(ids), dim) of `ids` under `feature`; the other features stay empty."""
    lengths = torch.zeros(len(feature_names), len(ids), dtype=torch.int32)
    lengths[feature_names.index(feature)] = 1
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=feature_names, values=ids.to(torch.int64),
                                              lengths=lengths.flatten())
    return model(kjt.to(device))[feature]


@torch.no_grad()
def item_matrix(model: nn.Module, feature_names: list[str], num_items: int, chunk: int,
                device: torch.device) -> torch.Tensor:
    """All item embeddings (num_items, dim); every rank makes the same lookups."""
    ids = torch.arange(num_items)
    return torch.cat([lookup(model, feature_names, ITEM_FEATURE, part, device)
                      for part in ids.split(chunk)])


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


def _rows_mask(users: np.ndarray, source: UserItems, num_items: int) -> torch.Tensor:
    """A (len(users), num_items) bool matrix of `source`'s items for each of `users`."""
    mask = torch.zeros(len(users), num_items, dtype=torch.bool)
    where = np.searchsorted(source.users, users)
    for row, (user, k) in enumerate(zip(users, where)):
        if k < len(source.users) and source.users[k] == user:
            mask[row, torch.from_numpy(source.items[source.indptr[k]:source.indptr[k + 1]])] = True
    return mask


@torch.no_grad()
def evaluate(model: nn.Module, feature_names: list[str], dataset_dir: Path, split: str,
             num_items: int, ks: list[int], user_batch: int, ctx: DistContext) -> dict[str, float]:
    """Recall@K and NDCG@K over the users with items in `split`, averaged over users."""
    was_training = model.training
    model.eval()
    items = item_matrix(model, feature_names, num_items, user_batch, ctx.device).cpu()
    targets = read_user_items(dataset_dir, split, rank=ctx.rank, world_size=ctx.world_size)
    seen = read_user_items(dataset_dir, "train", rank=ctx.rank, world_size=ctx.world_size)
    num_batches = ctx.all_reduce_max(math.ceil(len(targets.users) / user_batch))
    sums = {name: torch.zeros((), dtype=torch.float64)
            for k in ks for name in (f"recall@{k}", f"ndcg@{k}")}
    for b in range(num_batches):
        users = targets.users[b * user_batch:(b + 1) * user_batch]
        # Every rank must make the same number of lookups: an exhausted rank looks up user 0.
        ids = torch.from_numpy(users) if len(users) else torch.zeros(1, dtype=torch.int64)
        user_vectors = lookup(model, feature_names, USER_FEATURE, ids, ctx.device).cpu()
        if not len(users):
            continue
        scores = user_vectors @ items.T
        scores[_rows_mask(users, seen, num_items)] = -torch.inf
        for name, value in ranking_metrics(scores, _rows_mask(users, targets, num_items), ks).items():
            sums[name] += value
    names = sorted(sums)
    totals = ctx.all_reduce_sum(torch.stack([sums[n] for n in names] +
                                            [torch.tensor(float(len(targets.users)), dtype=torch.float64)]))
    model.train(was_training)
    return {name: float(totals[i] / totals[-1]) for i, name in enumerate(names)}
