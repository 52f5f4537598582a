"""Typed job configuration: one dataclass per concern, validated before any process group starts.

Hydra composes `configs/` on top of these schemas (registered by `register_configs`); the YAML
files of the groups only override defaults, which live here and nowhere else. The files of
`configs/experiment/` pin every setting a benchmark depends on, defaults included, so that a
changed default does not silently change a published figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from hydra.core.config_store import ConfigStore

from dsl_dist.config.checks import ConfigError, is_int, require
from dsl_dist.config.models import (SHARDING_TYPES, LightGCNConfig, LightGCNModelConfig,
                                    ModelConfig, MultVAEConfig, MultVAEModelConfig, NeuMFConfig,
                                    NeuMFModelConfig)
from dsl_dist.config.sections import (CPU_OPTIMIZERS, DENSE_OPTIMIZERS, OPTIMIZERS,
                                      CheckpointConfig, ControlConfig, DataConfig, EvalConfig,
                                      RayConfig, TrainConfig)
from dsl_dist.config.registry import MODELS, SPARSITY_METHODS, sparsity_config
from dsl_dist.config.sparsity import (BlockConfig, BlockDSLConfig, DropAndGrowConfig, DSLConfig,
                                      GradientGrowthConfig, SparsityConfig, UnstructuredConfig,
                                      check_schedule)

__all__ = ["CPU_OPTIMIZERS", "DENSE_OPTIMIZERS", "MODELS", "OPTIMIZERS", "SHARDING_TYPES",
           "SPARSITY_METHODS", "BlockConfig", "BlockDSLConfig", "CheckpointConfig",
           "ConfigError", "ControlConfig", "DSLConfig", "DataConfig", "DropAndGrowConfig",
           "EvalConfig", "GradientGrowthConfig", "JobConfig", "LightGCNConfig",
           "LightGCNModelConfig", "ModelConfig", "MultVAEConfig", "MultVAEModelConfig",
           "NeuMFConfig", "NeuMFModelConfig", "RayConfig", "SparsityConfig", "TrainConfig",
           "UnstructuredConfig", "check_schedule", "is_int", "register_configs", "require",
           "sparsity_config"]


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    """The schema of the model `model=<name>` picks (MF: this base)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    """The schema of the method `sparsity=<name>` picks (dense: this base, with no settings)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    run_dir: Optional[str] = None
    """Where metrics.jsonl and results go; None: runs/<data>-<model>-<sparsity>-<time>."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, else gloo), gloo or nccl."""

    def validate(self) -> None:
        for group, section, table in (("model", self.model, MODELS),
                                      ("sparsity", self.sparsity, SPARSITY_METHODS)):
            _require_schema(group, section.name, type(section), table)
        for section in (self.data, self.model, self.train, self.eval, self.checkpoint,
                        self.control, self.ray):
            section.validate()
        self.sparsity.validate(self.train.max_steps)
        require(self.backend in ("auto", "gloo", "nccl"), "backend", "must be auto, gloo or nccl",
                 self.backend)
        require(self.backend != "nccl" or torch.cuda.is_available(), "backend",
                "NCCL needs a CUDA device and torch sees none", self.backend)
        on_cpu = self.backend == "gloo" or (self.backend == "auto" and not torch.cuda.is_available())
        require(not on_cpu or self.train.optimizer in CPU_OPTIMIZERS, "train.optimizer",
                 f"FBGEMM on CPU offers {CPU_OPTIMIZERS}", self.train.optimizer)


def _require_schema(group: str, name: str, schema: type, table: Mapping[str, Any]) -> None:
    """`group.name` is registered, and the section was composed in its spec's schema."""
    spec = table.get(name)
    require(spec is not None, f"{group}.name", f"known: {', '.join(table)}", name)
    require(schema is spec.schema, f"{group}.name",
            f"names another option than the settings composed ({schema.__name__}); choose it "
            f"with {group}={name}", name)


def register_configs() -> None:
    """Registers the schema that `configs/config.yaml` extends and, per model and per method,
    the schema its option `configs/<group>/<name>.yaml` extends (`<name>_schema`)."""
    store = ConfigStore.instance()
    store.store(name="job_schema", node=JobConfig)
    for group, table in (("model", MODELS), ("sparsity", SPARSITY_METHODS)):
        for name, spec in table.items():
            store.store(group=group, name=f"{name}_schema", node=spec.schema(name=name))
