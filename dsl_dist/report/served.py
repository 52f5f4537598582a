"""Recall@K and NDCG@K of served recommendations, computed here from the test split alone (not
with dsl_dist.evaluation), so that the export and serve checks (tests and
benchmarks/export_serve.py) compare two independent computations with the run's own figures."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dsl_dist.data.stream import UserItems, read_user_items


def split_items(prepared: Path) -> UserItems:
    """The test split of the prepared data set at `prepared`, every user on one reader."""
    return read_user_items(prepared, "test", rank=0, world_size=1)


def metrics_at(tops: Sequence[Sequence[int]], test: UserItems, k: int) -> dict[str, float]:
    """Mean Recall@k and NDCG@k (binary gains) of `tops[j]`, the ranked item indices served to
    test.users[j], against the user's test items."""
    if len(tops) != len(test.users):
        raise ValueError(f"{len(tops)} ranked lists for {len(test.users)} test users")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recall = ndcg = 0.0
    for j, top in enumerate(tops):
        if not len(top) == len(set(top)) <= k:
            raise ValueError(f"test user {test.users[j]}: served list {list(top)} has repeats "
                             f"or more than k={k} items")
        relevant = set(test.items_of(j).tolist())
        hits = np.array([item in relevant for item in top], dtype=np.float64)
        recall += hits.sum() / len(relevant)
        ndcg += (hits * discounts[:len(hits)]).sum() / discounts[:min(k, len(relevant))].sum()
    return {f"recall@{k}": recall / len(tops), f"ndcg@{k}": ndcg / len(tops)}
