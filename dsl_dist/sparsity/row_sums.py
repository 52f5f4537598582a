"""Gradient sums per row, for the growth statistics, with no shape that depends on the data.

A step's lookups name some rows several times (several samples, several features); growth wants
each row's gradient summed over them before its absolute value is taken. torch.unique would
give the distinct rows, but its size is data: on a GPU, the host would wait for it every step.
"""

from __future__ import annotations

import torch


def sum_by_row(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, float32 sums of `values`' lines per distinct row), padded to len(rows) with zero
    sums at row 0 (adding them anywhere adds nothing). A stable sort keeps each row's
    additions in the order of the lookups."""
    ordered, order = torch.sort(rows, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(first, 0) - 1
    sums = torch.zeros(len(rows), values.shape[1], dtype=torch.float32,
                       device=values.device).index_add_(0, group, values[order].float())
    return torch.zeros_like(ordered).scatter_(0, group, ordered), sums
