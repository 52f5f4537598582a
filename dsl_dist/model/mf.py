"""BPR matrix factorisation on a TorchRec EmbeddingBagCollection.

The module is a plain `nn.Module` built on the `meta` device: `DistributedModelParallel` shards
its tables from outside, so nothing here knows about ranks.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from dsl_dist.data.stream import ITEM_FEATURE, USER_FEATURE, negative_feature_names

USER_TABLE = "user"
ITEM_TABLE = "item"


class MatrixFactorization(nn.Module):
    """score(u, i) = <e_u, e_i> with a user table and an item table.

    The item table serves the positive item feature and every negative-sample feature, so one
    lookup per feature returns a (batch, dim) tensor for each.

    Example::

        model = MatrixFactorization(num_users=10, num_items=20, embedding_dim=8, num_negatives=1)
        out = model(kjt)  # KeyedTensor with keys user, item, neg_0; out["user"]: (B, 8)
    """

    def __init__(self, num_users: int, num_items: int, embedding_dim: int, num_negatives: int,
                 device: torch.device = torch.device("meta")) -> None:
        super().__init__()
        self.item_features = [ITEM_FEATURE, *negative_feature_names(num_negatives)]
        self.embeddings = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=USER_TABLE, embedding_dim=embedding_dim,
                                   num_embeddings=num_users, feature_names=[USER_FEATURE]),
                EmbeddingBagConfig(name=ITEM_TABLE, embedding_dim=embedding_dim,
                                   num_embeddings=num_items, feature_names=self.item_features),
            ],
            device=device,
        )

    @property
    def feature_names(self) -> list[str]:
        return [USER_FEATURE, *self.item_features]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.embeddings(features)


def bpr_loss(embeddings: KeyedTensor, num_negatives: int, l2_reg: float) -> torch.Tensor:
    """Bayesian personalised ranking loss, averaged over positives and their negatives.

    The L2 term follows LightGCN's code: l2_reg · ½(‖e_u‖² + ‖e_i‖² + Σ‖e_j‖²) / batch.
    """
    users = embeddings[USER_FEATURE]
    positives = embeddings[ITEM_FEATURE]
    negatives = torch.stack([embeddings[f] for f in negative_feature_names(num_negatives)], dim=1)
    pos_scores = (users * positives).sum(-1, keepdim=True)
    neg_scores = torch.einsum("bd,bnd->bn", users, negatives)
    ranking = nn.functional.softplus(neg_scores - pos_scores).mean()
    squared = users.pow(2).sum() + positives.pow(2).sum() + negatives.pow(2).sum() / num_negatives
    return ranking + l2_reg * 0.5 * squared / users.shape[0]
