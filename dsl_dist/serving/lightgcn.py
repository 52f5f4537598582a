"""Serving LightGCN: its final embeddings are its exported layer-0 tables propagated over the
training graph as the run did (the model spec's serving module, see
dsl_dist/config/registry.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn import functional

from dsl_dist.config import JobConfig
from dsl_dist.data.graph import (CSRBags, InteractionGraph, PropagationBags,
                                 load_propagation_bags, propagation_bags)
from dsl_dist.model.lightgcn import propagate


def _bag_sum(bags: CSRBags, table: torch.Tensor) -> torch.Tensor:
    """Row r: Σ weights · table[ids] over bag r."""
    return functional.embedding_bag(bags.ids, table, bags.indptr[:-1], mode="sum",
                                    per_sample_weights=bags.weights,
                                    include_last_offset=False)


def lightgcn_embeddings(users: torch.Tensor, items: torch.Tensor, graph: InteractionGraph,
                        propagation: dict[str, Any], bags: Optional[PropagationBags] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """LightGCN's final (user, item) embeddings from its layer-0 tables, propagated as the run
    did (`propagation`: num_layers, propagation, max_neighbours; `bags`: the graph's
    propagation bags if at hand, else computed from `graph`)."""
    layers = propagation["num_layers"]
    if propagation["propagation"] == "full":
        final = propagate(graph.normalized_adjacency(), torch.cat([users, items]), layers)
        return final[:len(users)], final[len(users):]
    if bags is None:
        bags = propagation_bags(graph, layers, propagation["max_neighbours"])
    alpha = bags.self_weight
    return (alpha * users + _bag_sum(bags.user_to_users, users)
            + _bag_sum(bags.user_to_items, items),
            alpha * items + _bag_sum(bags.item_to_users, users)
            + _bag_sum(bags.item_to_items, items))


def settings(cfg: JobConfig) -> dict[str, Any]:
    """What the artifact records of the run's LightGCN settings (propagation as the run did)."""
    g = cfg.model.lightgcn
    return {"lightgcn": {"num_layers": g.num_layers, "propagation": g.propagation,
                         "max_neighbours": g.max_neighbours}}


def final_embeddings(users: torch.Tensor, items: torch.Tensor, graph: InteractionGraph,
                     meta: dict[str, Any], dataset_dir: Optional[Path]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer-0 tables propagated as the run did (`meta`: the artifact's model settings);
    with the data set at hand, from its cached bags (which the run built)."""
    g = meta["lightgcn"]
    bags = (load_propagation_bags(dataset_dir, g["num_layers"], g["max_neighbours"])
            if dataset_dir is not None and g["propagation"] == "bags" else None)
    return lightgcn_embeddings(users, items, graph, g, bags)
