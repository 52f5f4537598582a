"""Recall@K and NDCG@K of served recommendations, computed here from the test split alone (not
with dsl_dist.evaluation), and the run's own final figures to compare them with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from dsl_dist.data.stream import UserItems, read_user_items


def split_items(prepared: Path) -> UserItems:
    return read_user_items(prepared, "test", rank=0, world_size=1)


def metrics_at(tops: Sequence[Sequence[int]], test: UserItems, k: int) -> dict[str, float]:
    """Mean Recall@k and NDCG@k (binary gains) of `tops[j]`, the ranked item indices served to
    test.users[j], against the user's test items."""
    assert len(tops) == len(test.users)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recall = ndcg = 0.0
    for j, top in enumerate(tops):
        assert len(top) == len(set(top)) <= k
        relevant = set(test.items_of(j).tolist())
        hits = np.array([item in relevant for item in top], dtype=np.float64)
        recall += hits.sum() / len(relevant)
        ndcg += (hits * discounts[:len(hits)]).sum() / discounts[:min(k, len(relevant))].sum()
    return {f"recall@{k}": recall / len(tops), f"ndcg@{k}": ndcg / len(tops)}


def final_eval(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "eval"][-1]


def last_budget(run_dir: Path) -> int:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "update"][-1]["budget"]
