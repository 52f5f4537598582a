"""What each name a job's config may choose brings: the models (`model.name`) and the
sparse-training methods (`sparsity=<name>`).

A method's spec names the module that builds it, its config schema (the `sparsity` section
it carries, registered as the schema of the Hydra group option of its name) and how its
checkpoint state exports (a layout of dsl_dist/serving/method_state.py). A model's spec names
the module that builds it, its config schema (the `model` section, registered likewise) and
how serving scores it: a module of dsl_dist/serving, or why it is not served.
Importing a model or method module costs the seconds torchrec takes to import, so specs hold
module paths, imported on use. A new model or method is one module plus one line here.

- A model module defines `build(cfg: JobConfig, manifest: Manifest, dataset_dir: Path) ->
  Recommender` (the model on the meta device, ready for sharding) and may define
  `prepare_data(cfg: JobConfig, dataset_dir: Path) -> None`, which builds and caches what the
  model derives from the data set (one rank runs it before every rank builds the model). Its
  own settings, if it has any, are the section of its name that its schema adds to
  `ModelConfig` (dsl_dist/config/models.py).
- A method module defines `build(setup: SparsitySetup) -> SparsityMethod`
  (dsl_dist/sparsity/base.py) and may define `transform_model(cfg: SparsityConfig, model:
  nn.Module) -> nn.Module`, applied to the plain model (on the meta device) before sharding.
- A serving module defines `settings(cfg: JobConfig) -> dict` (what the artifact records of
  the model's config) and `final_embeddings(users, items, graph, settings, dataset_dir)` (the
  vectors serving scores by dot product, from the exported tables).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Mapping, Optional, Union

from dsl_dist.config.models import (LightGCNModelConfig, ModelConfig, MultVAEModelConfig,
                                    NeuMFModelConfig)
from dsl_dist.config.sparsity import BlockDSLConfig, DSLConfig, SETConfig, SparsityConfig


@dataclass(frozen=True)
class MethodSpec:
    module: str
    schema: type[SparsityConfig]
    export_layout: str
    """How export reads a table's state: dense (the table as trained), mask or blocks."""


@dataclass(frozen=True)
class ModelSpec:
    module: str
    schema: type[ModelConfig] = ModelConfig
    serving: Optional[str] = None
    """The module that serves the model; None: not served, for the reason `not_served`."""
    not_served: str = ""


MODELS: dict[str, ModelSpec] = {
    "mf": ModelSpec("dsl_dist.model.mf", serving="dsl_dist.serving.dot_product"),
    "lightgcn": ModelSpec("dsl_dist.model.lightgcn", LightGCNModelConfig,
                          serving="dsl_dist.serving.lightgcn"),
    "neumf": ModelSpec("dsl_dist.model.neumf", NeuMFModelConfig, not_served=(
        "NeuMF scores through an MLP over both embeddings, which serving does not implement")),
    "multvae": ModelSpec("dsl_dist.model.multvae", MultVAEModelConfig, not_served=(
        "Mult-VAE scores through its dense encoder and decoder, which serving does not "
        "implement")),
}
SPARSITY_METHODS: dict[str, MethodSpec] = {
    "dense": MethodSpec("dsl_dist.sparsity.dense", SparsityConfig, "dense"),
    "dsl": MethodSpec("dsl_dist.sparsity.unstructured.dsl", DSLConfig, "mask"),
    "block_dsl": MethodSpec("dsl_dist.sparsity.block.dsl", BlockDSLConfig, "blocks"),
    "set": MethodSpec("dsl_dist.sparsity.unstructured.set", SETConfig, "mask"),
}


def load(table: Mapping[str, Union[ModelSpec, MethodSpec]], name: str) -> ModuleType:
    """The module `table` registers under `name` (names are validated by the config)."""
    return importlib.import_module(table[name].module)



def sparsity_config(name: str, **settings: object) -> SparsityConfig:
    """Method `name`'s config section with `settings` (the rest at their defaults), as
    `sparsity=<name>` composes it."""
    return SPARSITY_METHODS[name].schema(name=name, **settings)  # type: ignore[arg-type]
