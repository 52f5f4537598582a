"""The model `model.name` names (see dsl_dist/config/registry.py), prepared for and built."""

from __future__ import annotations

from pathlib import Path

from dsl_dist.config import JobConfig
from dsl_dist.data.manifest import Manifest
from dsl_dist.model.base import Recommender
from dsl_dist.config.registry import MODELS, load


def prepare_model_data(cfg: JobConfig, dataset_dir: Path) -> None:
    """What the model derives from the data set, built and cached (run by one rank)."""
    prepare = getattr(load(MODELS, cfg.model.name), "prepare_data", None)
    if prepare is not None:
        prepare(cfg, dataset_dir)


def build_model(cfg: JobConfig, manifest: Manifest, dataset_dir: Path) -> Recommender:
    """The configured model on the meta device, ready for sharding."""
    return load(MODELS, cfg.model.name).build(cfg, manifest, dataset_dir)
