"""SET, Sparse Evolutionary Training (Mocanu et al. 2018): drop the active weights of smallest
|w|, grow inactive weights chosen uniformly at random. The standard control for "does gradient
growth matter?": DSL with the growth statistic replaced by chance.

The random choice is the top k of a hash of (seed, step, global position) among the candidates
(the weights inactive after the drop), so that it is uniform, exact and the same on any world
size and sharding, as DSL's choices are. SET records no gradients (its schema has no
growth signal). Masks, selection and moves are weights.py's.
"""

from __future__ import annotations

import torch

from dsl_dist.sparsity.base import SparsitySetup
from dsl_dist.sparsity.selection.hashing import uniform_hash
from dsl_dist.sparsity.unstructured.masks import MaskedShard
from dsl_dist.sparsity.unstructured.weights import WeightDropAndGrow, build_weight_method


def grow_seed(seed: int, step: int) -> int:
    """The hash seed of the grow scores of update step `step`: apart from those of the
    initial mask (`seed`) and of grown weights' values (`seed + step`)."""
    return ((seed + 1) << 32) + step


class SparseEvolutionaryTraining(WeightDropAndGrow):
    """SET's random grow over weight masks (its drop is the magnitude drop)."""

    def grow_entries(self, s: MaskedShard, rows: slice, dropped: torch.Tensor, step: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return uniform_hash(s.positions(rows), grow_seed(self.seed, step)), ~s.bits[rows] | dropped


def build(setup: SparsitySetup) -> SparseEvolutionaryTraining:
    """SET over the sparsified tables and dense parameters of `setup.model`."""
    return build_weight_method(setup, SparseEvolutionaryTraining)
