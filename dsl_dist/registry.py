"""The name → module tables of the models (`model.name`) and the sparse-training methods
(`sparsity.name`).

The config validates names against them before any process group starts, and importing a
model or method module costs the seconds torchrec takes to import, so the tables hold module
paths, imported on use. A new model or method is one module plus one line here.

- A model module defines `build(cfg: JobConfig, manifest: Manifest, dataset_dir: Path) ->
  Recommender` (the model on the meta device, ready for sharding) and may define
  `prepare_data(cfg: JobConfig, dataset_dir: Path) -> None`, which builds and caches what the
  model derives from the data set (one rank runs it before every rank builds the model). Its
  own settings are the `ModelConfig` section of its name, if it has one.
- A method module defines `build(setup: SparsitySetup) -> SparsityMethod`
  (dsl_dist/sparsity/base.py) and may define `transform_model(cfg: SparsityConfig, model:
  nn.Module) -> nn.Module`, applied to the plain model (on the meta device) before sharding.
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODELS: dict[str, str] = {
    "mf": "dsl_dist.model.mf",
    "lightgcn": "dsl_dist.model.lightgcn",
    "neumf": "dsl_dist.model.neumf",
    "multvae": "dsl_dist.model.multvae",
}
SPARSITY_METHODS: dict[str, str] = {
    "dense": "dsl_dist.sparsity.dense",
    "dsl": "dsl_dist.sparsity.unstructured.dsl",
    "block_dsl": "dsl_dist.sparsity.block.dsl",
}


def load(table: dict[str, str], name: str) -> ModuleType:
    """The module `table` registers under `name` (names are validated by the config)."""
    return importlib.import_module(table[name])
