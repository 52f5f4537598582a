"""NeuMF (He et al., 2017): a GMF tower and an MLP tower over their own user/item tables.

Each tower has its own EmbeddingBagCollection (a user and an item table), so DSL can sparsify
either path's tables (the paper's reference code masks the MLP path's) and each can be sharded
on its own. Full-ranking evaluation scores every (user, item) pair through the MLP; the first
layer is split into its user and item halves so that it is computed once per user and item.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from dsl_dist.data.stream import ITEM_FEATURE, USER_FEATURE, negative_feature_names
from dsl_dist.model.base import Recommender, collection_keys, lookup, rows_in_chunks

if TYPE_CHECKING:
    from dsl_dist.config import JobConfig
    from dsl_dist.data.manifest import Manifest

_PAIRS_PER_CHUNK = 1 << 20
"""(user, item) pairs whose hidden activations evaluation holds at once."""


def _tower_tables(prefix: str, dim: int, num_users: int, num_items: int,
                  item_features: list[str], device: torch.device) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"user_{prefix}", embedding_dim=dim, num_embeddings=num_users,
                           feature_names=[USER_FEATURE]),
        EmbeddingBagConfig(name=f"item_{prefix}", embedding_dim=dim, num_embeddings=num_items,
                           feature_names=item_features)], device=device)


class NeuMF(Recommender):
    """logit(u, i) = w · [gmf_u ⊙ gmf_i ; MLP([mlp_u ; mlp_i])] + b, trained with binary
    cross-entropy on every positive and its negatives.

    Example::

        model = NeuMF(num_users=10, num_items=20, embedding_dim=16, gmf_dim=8,
                      mlp_layers=[32, 16, 8], num_negatives=4)
        loss = model(kjt)  # kjt: keys user, item, neg_0..neg_3, one id per sample
    """

    def __init__(self, num_users: int, num_items: int, embedding_dim: int, gmf_dim: int,
                 mlp_layers: list[int], num_negatives: int,
                 device: torch.device = torch.device("meta")) -> None:
        super().__init__()
        self.num_items = num_items
        self.item_features = [ITEM_FEATURE, *negative_feature_names(num_negatives)]
        self.gmf = _tower_tables("gmf", gmf_dim, num_users, num_items, self.item_features, device)
        self.mlp = _tower_tables("mlp", embedding_dim, num_users, num_items, self.item_features,
                                 device)
        self.keys = collection_keys(self.gmf)  # the same features in both collections
        widths = [2 * embedding_dim, *mlp_layers]
        self.tower = nn.ModuleList(nn.Linear(a, b, device=device)
                                   for a, b in zip(widths[:-1], widths[1:]))
        self.predict = nn.Linear(gmf_dim + mlp_layers[-1], 1, device=device)

    def _logits(self, gmf_u: torch.Tensor, gmf_i: torch.Tensor, first_u: torch.Tensor,
                first_i: torch.Tensor) -> torch.Tensor:
        """Logits of pairs from the GMF embeddings and the first MLP layer's two halves
        (broadcast: users and items may be (U, 1, d) and (1, I, d))."""
        hidden = torch.relu(first_u + first_i)
        for layer in self.tower[1:]:
            hidden = torch.relu(layer(hidden))
        return self.predict(torch.cat([(gmf_u * gmf_i).expand(*hidden.shape[:-1], -1), hidden],
                                      -1)).squeeze(-1)

    def _first_layer(self, users: torch.Tensor | None, items: torch.Tensor | None
                     ) -> torch.Tensor:
        """The first MLP layer's user half (users given) or item half plus bias."""
        first = self.tower[0]
        half = first.in_features // 2
        if users is not None:
            return users @ first.weight[:, :half].T
        return items @ first.weight[:, half:].T + first.bias

    def forward(self, batch: KeyedJaggedTensor) -> torch.Tensor:
        gmf, mlp = self.gmf(batch), self.mlp(batch)
        logits = torch.stack([
            self._logits(gmf[USER_FEATURE], gmf[f], self._first_layer(mlp[USER_FEATURE], None),
                         self._first_layer(None, mlp[f]))
            for f in self.item_features], 1)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    @torch.no_grad()
    def item_side(self, device: torch.device, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(GMF item embeddings, the first MLP layer's item half), for all items."""
        gmf, mlp = (rows_in_chunks(self.num_items, chunk, device,
                                   lambda ids, c=c: lookup(c, self.keys, ITEM_FEATURE, ids))
                    for c in (self.gmf, self.mlp))
        return gmf, self._first_layer(None, mlp)

    @torch.no_grad()
    def user_side(self, items: tuple[torch.Tensor, torch.Tensor], users: torch.Tensor,
                  history: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(GMF user embeddings, the first MLP layer's user half)."""
        return (lookup(self.gmf, self.keys, USER_FEATURE, users),
                self._first_layer(lookup(self.mlp, self.keys, USER_FEATURE, users), None))

    @torch.no_grad()
    def score(self, items: tuple[torch.Tensor, torch.Tensor],
              users: tuple[torch.Tensor, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        gmf_items, first_items = (t[start:stop] for t in items)
        gmf_users, first_users = users
        step = max(1, _PAIRS_PER_CHUNK // max(stop - start, 1))
        return torch.cat([self._logits(gmf_users[s:s + step, None], gmf_items[None],
                                       first_users[s:s + step, None], first_items[None])
                          for s in range(0, len(gmf_users), step)])


def build(cfg: JobConfig, manifest: Manifest, dataset_dir: Path) -> NeuMF:
    m = cfg.model
    return NeuMF(manifest.num_users, manifest.num_items, m.embedding_dim, m.neumf.gmf_dim,
                 list(m.neumf.mlp_layers), cfg.data.num_negatives)
