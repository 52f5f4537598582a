"""Dense training: the sparsity method whose hooks do nothing."""

from __future__ import annotations

from dsl_dist.sparsity.base import SparsityMethod, SparsitySetup


def build(setup: SparsitySetup) -> SparsityMethod:
    return SparsityMethod()
