"""The `model` section: what every model has (ModelConfig) and, for a model with settings of
its own, a schema that adds them as a section of the model's name (`model.lightgcn.*`).
`model=<name>` composes the schema its spec names (config/registry.py), so that a setting of
another model is refused as an unknown key."""

from __future__ import annotations

from dataclasses import dataclass, field

from dsl_dist.config.checks import require

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")


@dataclass
class ModelConfig:
    """The recommender and how its embedding tables are sharded: what every model has (MF
    nothing more)."""

    name: str = "mf"
    """Model architecture: mf (BPR matrix factorisation), lightgcn, neumf or multvae; chosen
    with `model=<name>`, which composes that model's schema."""
    embedding_dim: int = 64
    init_std: float = 0.1
    """Embedding weights start as Normal(0, init_std), drawn per row block so that a weight's
    initial value does not depend on the world size or the sharding."""
    sharding_type: str = "table_wise"
    """Sharding of every table: table_wise, row_wise, column_wise or data_parallel."""
    table_sharding: dict[str, str] = field(default_factory=dict)
    """Per-table overrides of `sharding_type`, e.g. {item: row_wise}."""

    def validate(self) -> None:
        require(self.embedding_dim >= 4 and self.embedding_dim % 4 == 0, "model.embedding_dim",
                 "must be a positive multiple of 4 (FBGEMM's kernels need it)", self.embedding_dim)
        require(self.init_std > 0, "model.init_std", "must be > 0", self.init_std)
        for key, value in {"model.sharding_type": self.sharding_type,
                           **{f"model.table_sharding.{t}": s for t, s in self.table_sharding.items()}}.items():
            require(value in SHARDING_TYPES, key, f"must be one of {SHARDING_TYPES}", value)
        section = getattr(self, self.name, None)  # the model's own settings (its schema's)
        if section is not None:
            section.validate()

    def sharding_of(self, table: str) -> str:
        return self.table_sharding.get(table, self.sharding_type)


@dataclass
class LightGCNConfig:
    """LightGCN: the final embedding of a node is the mean of its first `num_layers` + 1
    propagation layers over the normalised user-item graph of the train split."""

    num_layers: int = 3
    propagation: str = "bags"
    """bags: each node's propagation weights, precomputed once, are looked up as weighted
    EmbeddingBags (scales with sharded tables; exact with max_neighbours=0); full: every step
    gathers both tables and propagates over the whole graph (exact; the tables and the graph
    must fit on each rank)."""
    max_neighbours: int = 64
    """bags: keep the largest this many propagation weights of each node per table (0: all,
    exact)."""

    def validate(self) -> None:
        require(self.num_layers >= 1, "model.lightgcn.num_layers", "must be >= 1",
                 self.num_layers)
        require(self.propagation in ("bags", "full"), "model.lightgcn.propagation",
                 "must be bags or full", self.propagation)
        require(self.max_neighbours >= 0, "model.lightgcn.max_neighbours", "must be >= 0",
                 self.max_neighbours)


@dataclass
class NeuMFConfig:
    """NeuMF (He et al. 2017): a GMF tower (elementwise product of `gmf_dim` embeddings) and an
    MLP tower over concatenated `embedding_dim` embeddings, fused by one linear layer; trained
    with binary cross-entropy on each positive and its `data.num_negatives` negatives."""

    gmf_dim: int = 16
    mlp_layers: list[int] = field(default_factory=lambda: [32, 16, 8])
    """Widths of the MLP tower's hidden layers (its input is 2 × model.embedding_dim)."""

    def validate(self) -> None:
        require(self.gmf_dim >= 4 and self.gmf_dim % 4 == 0, "model.neumf.gmf_dim",
                 "must be a positive multiple of 4 (FBGEMM's kernels need it)", self.gmf_dim)
        require(len(self.mlp_layers) > 0 and all(w >= 1 for w in self.mlp_layers),
                 "model.neumf.mlp_layers", "must be a non-empty list of positive widths",
                 self.mlp_layers)


@dataclass
class MultVAEConfig:
    """Mult-VAE (Liang et al. 2018) over each user's train items: encoder items → hidden →
    latent (mean, log-variance), decoder latent → hidden → items, multinomial likelihood.
    The encoder's first layer is a weighted bag over an item table of width
    model.embedding_dim (the hidden size), the decoder's last layer an item table of the same
    width."""

    latent_dim: int = 200
    dropout: float = 0.5
    """Input dropout on the user's items during training."""
    beta_max: float = 0.2
    """Cap of the KL term's weight, which grows linearly from 0 (Liang et al.'s annealing)."""
    anneal_steps: int = 200000
    """Training steps at which the KL weight would reach 1: weight = min(beta_max,
    step / anneal_steps)."""

    def validate(self) -> None:
        require(self.latent_dim >= 1, "model.multvae.latent_dim", "must be >= 1",
                 self.latent_dim)
        require(0 <= self.dropout < 1, "model.multvae.dropout", "must be in [0, 1)",
                 self.dropout)
        require(self.beta_max >= 0, "model.multvae.beta_max", "must be >= 0", self.beta_max)
        require(self.anneal_steps >= 1, "model.multvae.anneal_steps", "must be >= 1",
                 self.anneal_steps)


@dataclass
class LightGCNModelConfig(ModelConfig):
    lightgcn: LightGCNConfig = field(default_factory=LightGCNConfig)


@dataclass
class NeuMFModelConfig(ModelConfig):
    neumf: NeuMFConfig = field(default_factory=NeuMFConfig)


@dataclass
class MultVAEModelConfig(ModelConfig):
    multvae: MultVAEConfig = field(default_factory=MultVAEConfig)
