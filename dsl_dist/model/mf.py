"""BPR matrix factorisation on a TorchRec EmbeddingBagCollection."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from dsl_dist.data.stream import ITEM_FEATURE, USER_FEATURE, negative_feature_names
from dsl_dist.model.base import Recommender, collection_keys, lookup, rows_in_chunks

if TYPE_CHECKING:
    from dsl_dist.config import JobConfig
    from dsl_dist.data.manifest import Manifest

USER_TABLE = "user"
ITEM_TABLE = "item"


class MatrixFactorization(Recommender):
    """score(u, i) = <e_u, e_i> with a user table and an item table, trained with BPR.

    The item table serves the positive item feature and every negative-sample feature, so one
    lookup per feature returns a (batch, dim) tensor for each.

    Example::

        model = MatrixFactorization(num_users=10, num_items=20, embedding_dim=8,
                                    num_negatives=1, l2_reg=1e-4)
        loss = model(kjt)  # kjt: keys user, item, neg_0, one id per sample
    """

    fx_traceable = True

    def __init__(self, num_users: int, num_items: int, embedding_dim: int, num_negatives: int,
                 l2_reg: float, device: torch.device = torch.device("meta")) -> None:
        super().__init__()
        self.num_negatives, self.l2_reg = num_negatives, l2_reg
        item_features = [ITEM_FEATURE, *negative_feature_names(num_negatives)]
        self.embeddings = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=USER_TABLE, embedding_dim=embedding_dim,
                                   num_embeddings=num_users, feature_names=[USER_FEATURE]),
                EmbeddingBagConfig(name=ITEM_TABLE, embedding_dim=embedding_dim,
                                   num_embeddings=num_items, feature_names=item_features),
            ],
            device=device,
        )
        self.keys = collection_keys(self.embeddings)
        self.num_items = num_items

    def forward(self, batch: KeyedJaggedTensor) -> torch.Tensor:
        out = self.embeddings(batch)
        negatives = torch.stack([out[f] for f in negative_feature_names(self.num_negatives)], 1)
        return bpr_loss(out[USER_FEATURE], out[ITEM_FEATURE], negatives, self.l2_reg)

    @torch.no_grad()
    def item_side(self, device: torch.device, chunk: int) -> torch.Tensor:
        """All item embeddings (num_items, dim)."""
        return rows_in_chunks(self.num_items, chunk, device,
                              lambda ids: lookup(self.embeddings, self.keys, ITEM_FEATURE, ids))

    @torch.no_grad()
    def user_side(self, items: torch.Tensor, users: torch.Tensor,
                  history: KeyedJaggedTensor) -> torch.Tensor:
        return lookup(self.embeddings, self.keys, USER_FEATURE, users)

    @torch.no_grad()
    def score(self, items: torch.Tensor, users: torch.Tensor, start: int,
              stop: int) -> torch.Tensor:
        return users @ items[start:stop].T


def bpr_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             l2_reg: float, regularised: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Bayesian personalised ranking loss, averaged over positives and their negatives.

    users, positives: (batch, dim); negatives: (batch, num_negatives, dim). The L2 term follows
    LightGCN's code: l2_reg · ½(‖e_u‖² + ‖e_i‖² + Σ‖e_j‖² / num_negatives) / batch, over the
    scored embeddings or over `regularised` (the same three shapes: LightGCN's layer-0 ones).
    """
    pos_scores = (users * positives).sum(-1, keepdim=True)
    neg_scores = torch.einsum("bd,bnd->bn", users, negatives)
    ranking = nn.functional.softplus(neg_scores - pos_scores).mean()
    u, p, n = regularised or (users, positives, negatives)
    squared = u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum() / n.shape[1]
    return ranking + l2_reg * 0.5 * squared / users.shape[0]


def build(cfg: JobConfig, manifest: Manifest, dataset_dir: Path) -> MatrixFactorization:
    return MatrixFactorization(manifest.num_users, manifest.num_items, cfg.model.embedding_dim,
                               cfg.data.num_negatives, cfg.train.l2_reg)
