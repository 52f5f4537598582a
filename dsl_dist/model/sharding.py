"""Sharding a model's embedding tables with DistributedModelParallel and the planner.

The sharding type of each table is a planner constraint taken from config; the embedding
optimizer is fused into FBGEMM's backward pass (`apply_optimizer_in_backward`), except for
data-parallel tables, which TorchRec keeps as dense replicated parameters.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from dsl_dist.config import ModelConfig, TrainConfig
from dsl_dist.distributed import DistContext

OPTIMIZER_CLASSES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}


class EmbeddingBagCollectionSharderAnyDevice(EmbeddingBagCollectionSharder):
    """TorchRec offers row-wise sharding on CUDA only; it also works on CPU with gloo."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def embedding_tables(model: nn.Module) -> list[BaseEmbeddingConfig]:
    """The table configs of every EmbeddingBagCollection in `model` (before sharding): the
    tables as stored, which a sparsity method may have reshaped (block pools)."""
    return [table for module in model.modules() if isinstance(module, EmbeddingBagCollection)
            for table in module.embedding_bag_configs()]


KNOWN_WARNINGS = {
    "torchrec.distributed.planner.types": "otherwise, the job will fail",
    "torchrec.distributed.planner.storage_reservations": "known issue with TorchRec's dense",
    "torch.fx._symbolic_trace": "is_fx_tracing will return true",
}
"""Logger → text of warnings TorchRec 1.8 logs on every run, on every rank, about choices it
makes itself (the planner's topology and storage estimate, its own FX checks); they ask
nothing of us and would bury our lines, so `quiet_known_warnings` drops them, and only them."""


class _DropText(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_warnings() -> None:
    """Drops KNOWN_WARNINGS (and the planner's FutureWarning on its default storage
    reservation, which we use as TorchRec's examples do, and DCP's on ShardedTensors)."""
    for name, text in KNOWN_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) for f in logger.filters):
            logger.addFilter(_DropText(text))
    warnings.filterwarnings("ignore", message="HeuristicalStorageReservation is known",
                            category=FutureWarning)
    # torch.distributed.checkpoint warns at every load of TorchRec's sharded tables, which
    # are ShardedTensors: TorchRec's choice, nothing a run can change
    warnings.filterwarnings("ignore", message="Please use DTensor instead",
                            category=FutureWarning)


def shard_model(model: nn.Module, model_cfg: ModelConfig, train_cfg: TrainConfig,
                ctx: DistContext) -> DistributedModelParallel:
    """Plans and applies the sharding of `model`'s tables across the ranks of `ctx`."""
    optimizer_cls = OPTIMIZER_CLASSES[train_cfg.optimizer]
    tables = embedding_tables(model)
    apply_optimizer_in_backward(optimizer_cls, _embedding_parameters(model),
                                {"lr": train_cfg.lr})
    constraints = {
        table.name: ParameterConstraints(
            sharding_types=[model_cfg.sharding_of(table.name)],
            # Column-wise: one column block per rank, so the table really is split.
            min_partition=max(1, table.embedding_dim // ctx.world_size),
        )
        for table in tables
    }
    sharders = [EmbeddingBagCollectionSharderAnyDevice()]
    quiet_known_warnings()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=ctx.world_size, compute_device=ctx.device.type),
        constraints=constraints,
    )
    plan = planner.collective_plan(model, sharders, ctx.group)
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(ctx.group),
                                    device=ctx.device, plan=plan, sharders=sharders)


def _is_table(parameter_name: str) -> bool:
    return "embedding_bags" in parameter_name


def _embedding_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    return [p for name, p in model.named_parameters() if _is_table(name)]


def dense_optimizer(model: DistributedModelParallel,
                    train_cfg: TrainConfig) -> KeyedOptimizer | None:
    """The unfused optimizer of the parameters FBGEMM does not update in backward: data-parallel
    tables (the embedding optimizer's algorithm) and dense layers (`train.dense_optimizer`).
    None when there are none."""
    params: dict[str, Any] = dict(in_backward_optimizer_filter(model.named_parameters()))
    tables = {n: p for n, p in params.items() if _is_table(n)}
    layers = {n: p for n, p in params.items() if not _is_table(n)}
    parts = [(name, KeyedOptimizerWrapper(group, lambda ps, cls=cls, lr=lr: cls(ps, lr=lr)))
             for name, group, cls, lr in (
                 ("tables", tables, OPTIMIZER_CLASSES[train_cfg.optimizer], train_cfg.lr),
                 ("dense", layers, OPTIMIZER_CLASSES[train_cfg.dense_optimizer],
                  train_cfg.dense_lr))
             if group]
    if not parts:
        return None
    return parts[0][1] if len(parts) == 1 else CombinedOptimizer(parts)
