"""The job's config sections but sparsity's (see config/sparsity.py): data, model, training,
evaluation, checkpoints and launching, each validated on its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from dsl_dist.config.checks import require
from dsl_dist.config.registry import MODELS

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")
OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam", "sgd")
CPU_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
"""FBGEMM's CPU kernels have no fused Adam."""
DENSE_OPTIMIZERS = ("adagrad", "adam", "sgd")
PIPELINES = ("auto", "plain", "sparse_dist")


@dataclass
class DataConfig:
    """Where the interactions come from and how they are batched."""

    name: str = MISSING
    """Data set name, used in run directory names."""
    source: str = MISSING
    """Raw data: a directory of train/valid/test files (LightGCN text, CSV or Parquet)."""
    path: str = MISSING
    """Prepared Arrow shards (made from `source` on first use if missing)."""
    num_shards: int = 4
    """Parquet files per split when preparing."""
    valid_fraction: float = 0.0
    """When preparing a source without a validation file: hold out this fraction of each
    user's train interactions as the validation split (0: none)."""
    batch_size: int = 2048
    """Positive interactions per rank per step."""
    num_negatives: int = 1
    """Uniform negative items drawn per positive (BPR)."""
    shuffle_buffer: int = 65536
    """Rows mixed by the streaming shuffle buffer of each rank."""

    def validate(self) -> None:
        require(self.num_shards >= 1, "data.num_shards", "must be >= 1", self.num_shards)
        require(0 <= self.valid_fraction < 1, "data.valid_fraction", "must be in [0, 1)",
                self.valid_fraction)
        require(self.batch_size >= 1, "data.batch_size", "must be >= 1", self.batch_size)
        require(self.num_negatives >= 1, "data.num_negatives", "must be >= 1", self.num_negatives)
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1", self.shuffle_buffer)


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
class ModelConfig:
    """The recommender and how its embedding tables are sharded."""

    name: str = "mf"
    """Model architecture: mf (BPR matrix factorisation), lightgcn, neumf or multvae; the
    section of the same name holds its own settings."""
    embedding_dim: int = 64
    init_std: float = 0.1
    """Embedding weights start as Normal(0, init_std), drawn per row block so that a weight's
    initial value does not depend on the world size or the sharding."""
    sharding_type: str = "table_wise"
    """Sharding of every table: table_wise, row_wise, column_wise or data_parallel."""
    table_sharding: dict[str, str] = field(default_factory=dict)
    """Per-table overrides of `sharding_type`, e.g. {item: row_wise}."""
    lightgcn: LightGCNConfig = field(default_factory=LightGCNConfig)
    neumf: NeuMFConfig = field(default_factory=NeuMFConfig)
    multvae: MultVAEConfig = field(default_factory=MultVAEConfig)

    def validate(self) -> None:
        require(self.name in MODELS, "model.name", f"known models: {', '.join(MODELS)}",
                 self.name)
        require(self.embedding_dim >= 4 and self.embedding_dim % 4 == 0, "model.embedding_dim",
                 "must be a positive multiple of 4 (FBGEMM's kernels need it)", self.embedding_dim)
        require(self.init_std > 0, "model.init_std", "must be > 0", self.init_std)
        for key, value in {"model.sharding_type": self.sharding_type,
                           **{f"model.table_sharding.{t}": s for t, s in self.table_sharding.items()}}.items():
            require(value in SHARDING_TYPES, key, f"must be one of {SHARDING_TYPES}", value)
        section = getattr(self, self.name, None)  # a model's own settings, if it has any
        if section is not None:
            section.validate()

    def sharding_of(self, table: str) -> str:
        return self.table_sharding.get(table, self.sharding_type)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 20
    max_steps: Optional[int] = None
    """Stop after this many steps in total (None: run all epochs)."""
    optimizer: str = "rowwise_adagrad"
    """Embedding optimizer, fused into the backward pass by FBGEMM: rowwise_adagrad, adagrad,
    adam (CUDA only) or sgd. Data-parallel tables use the same algorithm, unfused."""
    lr: float = 0.05
    dense_optimizer: str = "adam"
    """Optimizer of the dense layers (NeuMF's towers, Mult-VAE's hidden layers): adagrad, adam
    or sgd (unfused, so Adam runs on CPU too)."""
    dense_lr: float = 1e-3
    l2_reg: float = 1e-4
    """BPR's L2 penalty on the embeddings looked up by each batch (MF, LightGCN)."""
    seed: int = 0
    log_every: int = 50
    """Print the training loss every this many steps (0: never)."""
    progress: bool = True
    """A progress bar per epoch on rank 0 (see dsl_dist/progress.py)."""
    progress_every_s: float = 30.0
    """Where stdout is not a terminal, the bar is a plain line every this many seconds."""
    tensorboard: bool = True
    """TensorBoard event files under <run_dir>/tensorboard (see dsl_dist/tensorboard_log.py)."""
    pipeline: str = "auto"
    """How steps run: plain (one after another), sparse_dist (TorchRec's
    TrainPipelineSparseDist: the next batches' copy and input distribution overlap the
    current step) or auto (sparse_dist for several ranks on CUDA, plain otherwise); see
    dsl_dist/pipeline.py."""

    def validate(self) -> None:
        require(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        require(self.pipeline in PIPELINES, "train.pipeline", f"must be one of {PIPELINES}",
                self.pipeline)
        require(self.max_steps is None or self.max_steps >= 1, "train.max_steps",
                 "must be >= 1 or null", self.max_steps)
        require(self.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {OPTIMIZERS}",
                 self.optimizer)
        require(self.lr > 0, "train.lr", "must be > 0", self.lr)
        require(self.dense_optimizer in DENSE_OPTIMIZERS, "train.dense_optimizer",
                 f"must be one of {DENSE_OPTIMIZERS}", self.dense_optimizer)
        require(self.dense_lr > 0, "train.dense_lr", "must be > 0", self.dense_lr)
        require(self.l2_reg >= 0, "train.l2_reg", "must be >= 0", self.l2_reg)
        require(self.log_every >= 0, "train.log_every", "must be >= 0", self.log_every)
        require(self.progress_every_s > 0, "train.progress_every_s", "must be > 0",
                self.progress_every_s)


@dataclass
class EvalConfig:
    """Full-ranking evaluation over all items, training positives excluded."""

    ks: list[int] = field(default_factory=lambda: [20])
    split: str = "test"
    every_epochs: int = 0
    """Also evaluate every this many epochs (0: only after training)."""
    memory_mb: int = 256
    """Scores held at once on a rank: a batch of users against a block of items (at most
    65536), with a running top-K across blocks, so that no catalogue needs more."""
    max_users: Optional[int] = None
    """Score a sample of about this many users (by a hash of their id; every metrics line
    says how many it scored); null: all users with items in the split."""
    select_split: Optional[str] = None
    """valid: every evaluation also scores this split, and the run's result is the
    evaluation with the best `select_metric` on it (a `best` line; its checkpoint kept with
    checkpoint.keep_best); null: the last evaluation is the result."""
    select_metric: str = "recall@20"

    def validate(self) -> None:
        require(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "eval.ks",
                 "must be a non-empty list of positive integers", self.ks)
        require(self.split in ("valid", "test"), "eval.split", "must be valid or test", self.split)
        require(self.every_epochs >= 0, "eval.every_epochs", "must be >= 0", self.every_epochs)
        require(self.memory_mb >= 1, "eval.memory_mb", "must be >= 1", self.memory_mb)
        require(self.max_users is None or self.max_users >= 1, "eval.max_users",
                "must be >= 1 or null", self.max_users)
        require(self.select_split in (None, "valid"), "eval.select_split",
                "must be valid or null", self.select_split)
        require(self.select_split != self.split, "eval.select_split",
                "must differ from eval.split (select on one split, report another)",
                self.select_split)
        metrics = [f"{name}@{k}" for name in ("recall", "ndcg") for k in self.ks]
        require(self.select_metric in metrics, "eval.select_metric", f"must be one of {metrics}",
                self.select_metric)


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (see dsl_dist/checkpoint.py) and resuming from them."""

    every: int = 0
    """Save every this many training steps (0: only at the end of training)."""
    keep: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    keep_best: bool = True
    """With eval.select_split: also keep the checkpoint of the best evaluation, in
    <checkpoints>/best (never resumed from; export it)."""
    dir: Optional[str] = None
    """Where checkpoints go; null: <run_dir>/checkpoints."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint of an unfinished run in run_dir (a
    restarted job picks up where it stopped); never: refuse a run_dir that holds a run; or the
    path of a checkpoint directory to start from."""

    def validate(self) -> None:
        require(self.every >= 0, "checkpoint.every", "must be >= 0", self.every)
        require(self.keep >= 1, "checkpoint.keep", "must be >= 1", self.keep)
        require(bool(self.resume), "checkpoint.resume", "must be auto, never or a path",
                 self.resume)


@dataclass
class ControlConfig:
    """Where the drop-and-grow controller lives (see dsl_dist/control)."""

    controller: str = "auto"
    """collective: torch.distributed collectives, rank 0's replica authoritative; ray: a named
    Ray actor; auto: ray inside a Ray job or when a Ray address is given, else collective."""
    ray_address: Optional[str] = None
    """Ray cluster for the controller actor; null: the RAY_ADDRESS environment variable."""
    actor_name: Optional[str] = None
    """Name of an existing controller actor (set by the Ray launcher); null: a new one."""

    def validate(self) -> None:
        require(self.controller in ("auto", "collective", "ray"), "control.controller",
                 "must be auto, collective or ray", self.controller)


@dataclass
class RayConfig:
    """The Ray Train launcher (`python -m dsl_dist.ray_train`)."""

    num_workers: int = 2
    """Training workers (ranks)."""
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    """One GPU per worker (NCCL); false: CPU workers with gloo."""
    storage_path: str = "~/dsl-dist"
    """Where a Ray job keeps its runs: run_dir (by default <storage_path>/runs/<run name>; a
    relative run_dir is taken under it) and Ray Train's results (<storage_path>/ray_train).
    Outside the job's working directory, which `ray job submit` copies to a temporary place
    that goes with the Ray session; on several nodes, a file system every node sees."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may make after a failure."""

    def validate(self) -> None:
        require(self.num_workers >= 1, "ray.num_workers", "must be >= 1", self.num_workers)
        require(self.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0",
                 self.cpus_per_worker)
        require("://" not in self.storage_path, "ray.storage_path",
                "must be a directory (runs are files: a shared file system on several nodes)",
                self.storage_path)
        require(self.max_failures >= -1, "ray.max_failures", "must be >= -1 (-1: unlimited)",
                 self.max_failures)
