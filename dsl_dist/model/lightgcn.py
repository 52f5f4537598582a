"""LightGCN (He et al., 2020) on sharded embedding tables, propagated in one of two ways.

LightGCN is linear: the final embedding of node v is e(v) = Σ_x P[v, x] e0(x) with the fixed
matrix P = Σ_k α_k Â^k (α_k = 1/(K+1), Â the normalised user-item adjacency). So:

- `bags` (scales with sharded tables): each node's row of P − α_0·I, split into a user-table
  part and an item-table part and truncated to its `max_neighbours` largest weights, is
  precomputed once (dsl_dist/data/graph.py) and looked up as two weighted EmbeddingBags, plus
  the node's own row (weight α_0). A step costs batch × 2·max_neighbours row lookups and only
  those rows are updated, wherever the tables live; with max_neighbours=0 (every weight kept)
  it is exact, but P's rows are long (3 hops reach most of the graph).
- `full` (exact; the tables and the graph must fit on each rank): every step looks up both
  whole tables through the sharded collection and propagates them over the graph, as the
  reference implementation does; every row gets a gradient and is updated.

The L2 penalty is on the batch's layer-0 (own) embeddings, as in LightGCN's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from dsl_dist.data.graph import (PropagationBags, check_num_layers, load_propagation_bags,
                                 read_graph)
from dsl_dist.data.stream import ITEM_FEATURE, USER_FEATURE, negative_feature_names
from dsl_dist.model.base import Recommender, collection_keys, feature_batch, ones, rows_in_chunks
from dsl_dist.model.mf import ITEM_TABLE, USER_TABLE, bpr_loss

if TYPE_CHECKING:
    from dsl_dist.config import JobConfig
    from dsl_dist.data.manifest import Manifest

_USERS, _ITEMS = ".users", ".items"  # feature suffixes: a node's bag over each table


class LightGCN(Recommender):
    """BPR-trained LightGCN; `graph` is a PropagationBags (bags) or the normalised adjacency
    (full), kept as a plain attribute: it is data, not a parameter or a buffer."""

    def __init__(self, num_users: int, num_items: int, embedding_dim: int, num_negatives: int,
                 l2_reg: float, num_layers: int, graph: PropagationBags | torch.Tensor,
                 device: torch.device = torch.device("meta")) -> None:
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.num_negatives, self.l2_reg, self.num_layers = num_negatives, l2_reg, num_layers
        self.graph = graph
        self.bags = isinstance(graph, PropagationBags)
        self.negative_features = negative_feature_names(num_negatives)
        roles = [USER_FEATURE, ITEM_FEATURE, *self.negative_features]
        user_features, item_features = [USER_FEATURE], [ITEM_FEATURE, *self.negative_features]
        if self.bags:
            user_features += [role + _USERS for role in roles]
            item_features += [role + _ITEMS for role in roles]
        self.embeddings = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=USER_TABLE, embedding_dim=embedding_dim,
                                       num_embeddings=num_users, feature_names=user_features),
                    EmbeddingBagConfig(name=ITEM_TABLE, embedding_dim=embedding_dim,
                                       num_embeddings=num_items, feature_names=item_features)],
            is_weighted=self.bags, device=device)
        self.keys = collection_keys(self.embeddings)
        self.fx_traceable = self.bags  # full propagation builds its lookups in forward

    def _graph_on(self, device: torch.device) -> PropagationBags | torch.Tensor:
        if self.bags:
            return self.graph
        if self.graph.device != device:
            self.graph = self.graph.to(device)
        return self.graph

    def _bag_batch(self, nodes: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
        """The lookups of `nodes` ({role: ids on the host}; the user role's ids are users, the
        others items, all of the same length): each node's own row and its two bags."""
        bags: PropagationBags = self.graph
        parts = {}
        for role, ids in nodes.items():
            to_users, to_items = ((bags.user_to_users, bags.user_to_items) if role == USER_FEATURE
                                  else (bags.item_to_users, bags.item_to_items))
            parts[role] = (ones(len(ids), ids.device), ids, None)
            parts[role + _USERS] = to_users.gather(ids)
            parts[role + _ITEMS] = to_items.gather(ids)
        return feature_batch(self.keys, len(next(iter(nodes.values()))), parts, weighted=True)

    def _propagated_bags(self, batch: KeyedJaggedTensor, roles: list[str]
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Final and layer-0 embeddings of the nodes of `roles` in a `_bag_batch`."""
        out = self.embeddings(batch)
        ego = {role: out[role] for role in roles}
        final = {role: self.graph.self_weight * ego[role] + out[role + _USERS]
                 + out[role + _ITEMS] for role in roles}
        return final, ego

    def _propagated_ids(self, role: str, ids: torch.Tensor) -> torch.Tensor:
        """Final embeddings of the nodes `ids` (on the device) of one role (evaluation: the
        ids go to the host for their bags and back)."""
        batch = self._bag_batch({role: ids.cpu()}).to(ids.device)
        return self._propagated_bags(batch, [role])[0][role]

    def host_batch(self, batch: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """bags: the stream's (user, item, negatives) with every node's bags, gathered here on
        the host."""
        if not self.bags:
            return batch
        return self._bag_batch({role: batch[role].values() for role in self._roles})

    def _propagated_full(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(final, layer-0) embeddings of all nodes, users first: one lookup of every row of
        both tables (bag j of `user` holds user j, bag num_users + i of `item` holds item i,
        so the two pooled outputs add up to the stacked tables)."""
        n = self.num_users + self.num_items
        user_lengths = (torch.arange(n, device=device) < self.num_users).to(torch.int32)
        batch = feature_batch(self.keys, n, {
            USER_FEATURE: (user_lengths, torch.arange(self.num_users, device=device), None),
            ITEM_FEATURE: (1 - user_lengths, torch.arange(self.num_items, device=device), None)})
        out = self.embeddings(batch)
        ego = out[USER_FEATURE] + out[ITEM_FEATURE]
        return propagate(self._graph_on(device), ego, self.num_layers), ego

    @property
    def _roles(self) -> list[str]:
        return [USER_FEATURE, ITEM_FEATURE, *self.negative_features]

    def forward(self, batch: KeyedJaggedTensor) -> torch.Tensor:
        if self.bags:
            final, ego = self._propagated_bags(batch, self._roles)
            scored = [final[USER_FEATURE], final[ITEM_FEATURE],
                      torch.stack([final[f] for f in self.negative_features], 1)]
            own = [ego[USER_FEATURE], ego[ITEM_FEATURE],
                   torch.stack([ego[f] for f in self.negative_features], 1)]
        else:
            users, items = batch[USER_FEATURE].values(), batch[ITEM_FEATURE].values()
            negatives = [batch[f].values() for f in self.negative_features]
            final, ego = self._propagated_full(users.device)
            rows = [users, items + self.num_users,
                    torch.stack(negatives, 1) + self.num_users]
            scored, own = [final[r] for r in rows], [ego[r] for r in rows]
        return bpr_loss(*scored, self.l2_reg, regularised=own)

    @torch.no_grad()
    def item_side(self, device: torch.device, chunk: int) -> torch.Tensor:
        """Final embeddings of all items (bags), or of all nodes (full)."""
        if not self.bags:
            return self._propagated_full(device)[0]
        return rows_in_chunks(self.num_items, chunk, device,
                              lambda ids: self._propagated_ids(ITEM_FEATURE, ids))

    @torch.no_grad()
    def user_side(self, items: torch.Tensor, users: torch.Tensor,
                  history: KeyedJaggedTensor) -> torch.Tensor:
        if not self.bags:
            return items[users]
        return self._propagated_ids(USER_FEATURE, users)

    @torch.no_grad()
    def score(self, items: torch.Tensor, users: torch.Tensor, start: int,
              stop: int) -> torch.Tensor:
        first = 0 if self.bags else self.num_users  # full: every node, users first
        return users @ items[first + start:first + stop].T


def propagate(adjacency: torch.Tensor, embeddings: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Σ_k α_k Â^k E0 over k = 0..num_layers, α_k = 1/(num_layers + 1), differentiable with
    respect to `embeddings`. `adjacency` (sparse, e.g. `normalized_adjacency()` on the
    embeddings' device) must be symmetric: the backward pass propagates the gradient with the
    same matrix, which is several times faster than autograd's transposed CSR product."""
    check_num_layers(num_layers)
    if (adjacency.dim() != 2 or embeddings.dim() != 2
            or not adjacency.shape[0] == adjacency.shape[1] == len(embeddings)):
        raise ValueError(f"adjacency {tuple(adjacency.shape)} and embeddings "
                         f"{tuple(embeddings.shape)}: need N × N and N × dim")
    return _Propagate.apply(embeddings, adjacency, num_layers)


class _Propagate(torch.autograd.Function):
    """x ↦ Σ_k α_k Â^k x, whose gradient is the same map (Â is symmetric)."""

    @staticmethod
    def forward(ctx, embeddings: torch.Tensor, adjacency: torch.Tensor,
                num_layers: int) -> torch.Tensor:
        ctx.adjacency, ctx.num_layers = adjacency, num_layers
        return _sum_of_powers(adjacency, embeddings, num_layers)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _sum_of_powers(ctx.adjacency, grad, ctx.num_layers), None, None


def _sum_of_powers(adjacency: torch.Tensor, x: torch.Tensor, num_layers: int) -> torch.Tensor:
    total = x
    for _ in range(num_layers):
        x = torch.sparse.mm(adjacency, x)
        total = total + x
    return total / (num_layers + 1)


def prepare_data(cfg: JobConfig, dataset_dir: Path) -> None:
    """Builds the propagation bags' cache (the bags propagation reads it)."""
    g = cfg.model.lightgcn
    if g.propagation == "bags":
        load_propagation_bags(dataset_dir, g.num_layers, g.max_neighbours)


def build(cfg: JobConfig, manifest: Manifest, dataset_dir: Path) -> LightGCN:
    g = cfg.model.lightgcn
    graph = (load_propagation_bags(dataset_dir, g.num_layers, g.max_neighbours)
             if g.propagation == "bags" else read_graph(dataset_dir).normalized_adjacency())
    return LightGCN(manifest.num_users, manifest.num_items, cfg.model.embedding_dim,
                    cfg.data.num_negatives, cfg.train.l2_reg, g.num_layers, graph)

