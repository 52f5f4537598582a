"""Ranking metrics against a per-user brute-force definition."""

from __future__ import annotations

import math

import torch

from dsl_dist.evaluation import ranking_metrics


def reference(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> tuple[float, float]:
    recall = ndcg = 0.0
    for row, rel in zip(scores.tolist(), relevant.tolist()):
        ranked = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        truth = {i for i, r in enumerate(rel) if r}
        hits = [1.0 if i in truth else 0.0 for i in ranked]
        recall += sum(hits) / len(truth)
        dcg = sum(h / math.log2(pos + 2) for pos, h in enumerate(hits))
        idcg = sum(1 / math.log2(pos + 2) for pos in range(min(k, len(truth))))
        ndcg += dcg / idcg
    return recall, ndcg


def test_ranking_metrics_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 30, generator=generator, dtype=torch.float64)  # no ties
    relevant = torch.rand(40, 30, generator=generator) < 0.2
    relevant[:, 0] = True  # every user has something relevant
    scores[relevant.logical_not() & (torch.rand(40, 30, generator=generator) < 0.1)] = -torch.inf
    sums = ranking_metrics(scores, relevant, [1, 5, 20])
    for k in (1, 5, 20):
        recall, ndcg = reference(scores, relevant, k)
        assert math.isclose(float(sums[f"recall@{k}"]), recall, rel_tol=1e-9)
        assert math.isclose(float(sums[f"ndcg@{k}"]), ndcg, rel_tol=1e-9)


def test_perfect_ranking_scores_one() -> None:
    relevant = torch.zeros(3, 10, dtype=torch.bool)
    relevant[0, :2] = relevant[1, 5] = relevant[2, 3:6] = True
    sums = ranking_metrics(relevant.double(), relevant, [3])
    assert float(sums["ndcg@3"]) == 3.0 and float(sums["recall@3"]) == 3.0
