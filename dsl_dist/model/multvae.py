"""Mult-VAE (Liang et al., 2018) with its two item-sized layers as sharded embedding tables.

The encoder's first layer (items → hidden) is a weighted EmbeddingBag over an item table,
pooled over the user's train items with the usual L2-normalised, dropped-out input; the
decoder's last layer (hidden → items) is a second item table, whose rows are every item's
output weights: each step looks the whole table up (every rank, through the sharded
collection) to score all items for the multinomial likelihood, as the full softmax needs.

Randomness (input dropout, the reparameterisation noise) is drawn from a generator seeded by
(seed, training step, the batch's first user), so that a resumed run draws what the
uninterrupted one did and ranks, which hold different users, draw differently.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, JaggedTensor, KeyedJaggedTensor

from dsl_dist.data.stream import HISTORY_FEATURE, ITEM_FEATURE, USER_FEATURE
from dsl_dist.model.base import HISTORIES, Recommender, collection_keys, feature_batch, ones

if TYPE_CHECKING:
    from dsl_dist.config import JobConfig
    from dsl_dist.data.manifest import Manifest

ENCODER_TABLE = "item_encoder"
DECODER_TABLE = "item_decoder"


class MultVAE(Recommender):
    """items → (item table, bag) → tanh → hidden → (mean, log-variance) of the latent;
    latent → hidden → tanh → (item table) → logits over all items.

    Example::

        model = MultVAE(num_items=20, hidden_dim=16, latent_dim=8, dropout=0.5,
                        beta_max=0.2, anneal_steps=1000, seed=0)
        loss = model(kjt)  # kjt: keys user (one id per sample), history (the user's items)
    """

    batches = HISTORIES

    def __init__(self, num_items: int, hidden_dim: int, latent_dim: int, dropout: float,
                 beta_max: float, anneal_steps: int, seed: int,
                 device: torch.device = torch.device("meta")) -> None:
        super().__init__()
        self.num_items, self.dropout = num_items, dropout
        self.beta_max, self.anneal_steps, self.seed = beta_max, anneal_steps, seed
        self.encoder_items = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=ENCODER_TABLE, embedding_dim=hidden_dim, num_embeddings=num_items,
            feature_names=[HISTORY_FEATURE])], is_weighted=True, device=device)
        self.decoder_items = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=DECODER_TABLE, embedding_dim=hidden_dim, num_embeddings=num_items,
            feature_names=[ITEM_FEATURE])], device=device)
        self.encoder_keys = collection_keys(self.encoder_items)
        self.decoder_keys = collection_keys(self.decoder_items)
        self.encoder_bias = nn.Parameter(torch.empty(hidden_dim, device=device))
        self.encode = nn.Linear(hidden_dim, 2 * latent_dim, device=device)
        self.decode = nn.Linear(latent_dim, hidden_dim, device=device)
        self.item_bias = nn.Parameter(torch.empty(num_items, device=device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        """Training steps taken (anneals the KL weight); a buffer, so checkpoints keep it."""

    def reset_parameters(self) -> None:
        """Initialises this module's own parameters (DMP calls it after materialising them)."""
        nn.init.zeros_(self.encoder_bias)
        nn.init.zeros_(self.item_bias)

    def _encode(self, history: JaggedTensor, keep: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of each user's latent from the L2-normalised history (of which
        only the `keep` entries count, rescaled, when dropping out)."""
        lengths, items = history.lengths(), history.values()
        weights = torch.repeat_interleave(lengths.clamp(min=1).float().rsqrt(), lengths)
        if keep is not None:
            weights = weights * keep / (1 - self.dropout)
        bag = feature_batch(self.encoder_keys, len(lengths),
                            {HISTORY_FEATURE: (lengths, items, weights)}, weighted=True)
        hidden = torch.tanh(self.encoder_items(bag)[HISTORY_FEATURE] + self.encoder_bias)
        mean, log_var = self.encode(hidden).chunk(2, dim=-1)
        return mean, log_var

    def _decoder_weights(self, device: torch.device) -> torch.Tensor:
        """The whole decoder item table (num_items, hidden), looked up through the shards."""
        ids = torch.arange(self.num_items, device=device)
        bag = feature_batch(self.decoder_keys, self.num_items,
                            {ITEM_FEATURE: (ones(self.num_items, device), ids, None)})
        return self.decoder_items(bag)[ITEM_FEATURE]

    def _logits(self, latent: torch.Tensor, decoder: torch.Tensor, start: int = 0,
                stop: int | None = None) -> torch.Tensor:
        """Logits of items [start, stop) (`decoder`: their rows of the decoder table)."""
        return torch.tanh(self.decode(latent)) @ decoder.T + self.item_bias[start:stop]

    def forward(self, batch: KeyedJaggedTensor) -> torch.Tensor:
        users, history = batch[USER_FEATURE].values(), batch[HISTORY_FEATURE]
        device = users.device
        generator = torch.Generator().manual_seed(
            hash((self.seed, int(self.step), int(users[0]))) & (2**63 - 1))
        keep = (torch.rand(len(history.values()), generator=generator) >= self.dropout
                ).float().to(device)
        mean, log_var = self._encode(history, keep)
        noise = torch.randn(mean.shape, generator=generator).to(device)
        latent = mean + torch.exp(0.5 * log_var) * noise
        log_probs = torch.log_softmax(self._logits(latent, self._decoder_weights(device)), -1)
        rows = torch.repeat_interleave(torch.arange(len(users), device=device), history.lengths())
        likelihood = log_probs[rows, history.values()].sum() / len(users)
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(-1).mean()
        beta = min(self.beta_max, float(self.step) / self.anneal_steps)
        self.step += 1
        return -likelihood + beta * kl

    @torch.no_grad()
    def item_side(self, device: torch.device, chunk: int) -> torch.Tensor:
        return self._decoder_weights(device)

    @torch.no_grad()
    def user_side(self, items: torch.Tensor, users: torch.Tensor,
                  history: KeyedJaggedTensor) -> torch.Tensor:
        """The users' latent means, encoded from their train items."""
        return self._encode(history[HISTORY_FEATURE], None)[0]

    @torch.no_grad()
    def score(self, items: torch.Tensor, users: torch.Tensor, start: int,
              stop: int) -> torch.Tensor:
        return self._logits(users, items[start:stop], start, stop)


def build(cfg: JobConfig, manifest: Manifest, dataset_dir: Path) -> MultVAE:
    v = cfg.model.multvae
    return MultVAE(manifest.num_items, cfg.model.embedding_dim, v.latent_dim, v.dropout,
                   v.beta_max, v.anneal_steps, cfg.train.seed)
