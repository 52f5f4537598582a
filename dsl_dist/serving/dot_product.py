"""Serving a model whose final embeddings are its tables (MF): a user's items are scored by
the dot product of their exported rows (the model spec's serving module, see
dsl_dist/config/registry.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from dsl_dist.config import JobConfig
from dsl_dist.data.graph import InteractionGraph


def settings(cfg: JobConfig) -> dict[str, Any]:
    """Nothing beyond the tables."""
    return {}


def final_embeddings(users: torch.Tensor, items: torch.Tensor, graph: InteractionGraph,
                     meta: dict[str, Any], dataset_dir: Optional[Path]) -> None:
    """None: the final embeddings are the tables themselves."""
    return None
