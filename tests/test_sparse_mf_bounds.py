"""benchmarks/sparse_mf_bounds.py's prefix masks: every row a prefix of the columns, widths
following popularity ** alpha, the budget exact."""

from __future__ import annotations

import numpy as np
import torch

from sparse_mf_bounds import prefix_mask

from dsl_dist.data.graph import InteractionGraph

DIM = 16


def rows_of(graph: InteractionGraph, alpha: float, budget: int) -> torch.Tensor:
    return prefix_mask(graph, DIM, alpha, budget).view(-1, DIM)  # user rows, then item rows


def graph_with_item_counts(counts: list[int]) -> InteractionGraph:
    items = np.repeat(np.arange(len(counts)), counts)
    return InteractionGraph(num_users=3, num_items=len(counts),
                            users=np.arange(len(items)) % 3, items=items)


def test_rows_are_prefixes_and_the_budget_is_exact() -> None:
    graph = graph_with_item_counts([1, 3, 8, 30])
    for alpha in (0.0, 0.5, 1.0):
        mask = rows_of(graph, alpha, budget=23)
        assert int(mask.sum()) == 23
        widths = mask.sum(1)
        for row, width in zip(mask, widths):
            assert row[:width].all() and not row[width:].any()


def test_alpha_zero_is_uniform_and_a_larger_alpha_widens_popular_rows() -> None:
    graph = graph_with_item_counts([1, 3, 8, 30])
    uniform = rows_of(graph, 0.0, budget=28).sum(1)
    assert int(uniform.max() - uniform.min()) <= 1
    items = rows_of(graph, 1.0, budget=28).sum(1)[graph.num_users:]
    assert items.tolist() == sorted(items.tolist()) and items[-1] > items[0] + 2
