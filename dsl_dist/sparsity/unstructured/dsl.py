"""Dynamic Sparse Learning (the paper's method) on single weights: drop the active weights of
smallest |w|, grow the inactive weights of largest growth statistic (|gradient|, see
growth.py). The active weights an update drops may grow straight back (and keep their value).
Masks, selection and moves are weights.py's."""

from __future__ import annotations

import torch

from dsl_dist.config import DSLConfig
from dsl_dist.sparsity.base import SparsitySetup
from dsl_dist.sparsity.unstructured.masks import MaskedShard
from dsl_dist.sparsity.unstructured.weights import WeightDropAndGrow, build_weight_method


class DynamicSparseTraining(WeightDropAndGrow):
    """DSL's grow scores over weight masks (its drop is the magnitude drop)."""

    @staticmethod
    def statistic_dtype(cfg: DSLConfig) -> torch.dtype:  # type: ignore[override]
        return getattr(torch, cfg.growth_dtype)

    @property
    def grow_score_bits(self) -> int:
        return 8 * self.statistic_dtype(self.cfg).itemsize

    def grow_entries(self, s: MaskedShard, rows: slice, dropped: torch.Tensor, step: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return s.growth[rows], ~s.bits[rows] | dropped


def build(setup: SparsitySetup) -> DynamicSparseTraining:
    """DSL over the sparsified tables and dense parameters of `setup.model`."""
    return build_weight_method(setup, DynamicSparseTraining)
