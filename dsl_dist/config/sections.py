"""The job's config sections but the model's and sparsity's (config/models.py,
config/sparsity.py), whose schemas depend on the option chosen: data, training, evaluation,
checkpoints and launching, each validated on its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from dsl_dist.config.checks import require

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
