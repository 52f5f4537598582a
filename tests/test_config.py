"""The Hydra configs compose onto the typed schema, and bad values are refused by key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException

from conftest import REPO
from dsl_dist.config import MODELS, ConfigError, JobConfig, register_configs


def load(*overrides: str) -> JobConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def test_defaults_compose_to_a_valid_job() -> None:
    cfg = load()
    assert isinstance(cfg, JobConfig)
    assert cfg.data.name == "lastfm" and cfg.model.name == "mf" and cfg.sparsity.name == "dense"
    cfg.validate()


def test_overrides_and_groups() -> None:
    cfg = load("data=gowalla", "model.embedding_dim=32", "train.epochs=5",
               "+model.table_sharding.item=row_wise")
    assert (cfg.data.name, cfg.model.embedding_dim, cfg.train.epochs) == ("gowalla", 32, 5)
    assert cfg.model.sharding_of("item") == "row_wise"
    assert cfg.model.sharding_of("user") == "table_wise"


def test_unknown_key_and_wrong_type_are_refused() -> None:
    with pytest.raises(ConfigCompositionException, match="learning_rate"):
        load("train.learning_rate=1")
    with pytest.raises(ConfigCompositionException, match="epochs"):
        load("train.epochs=many")


@pytest.mark.parametrize("override, key", [
    ("model.sharding_type=diagonal", "model.sharding_type"),
    ("train.optimizer=lbfgs", "train.optimizer"),
    ("train.lr=0", "train.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("model.embedding_dim=13", "model.embedding_dim"),
    ("eval.ks=[]", "eval.ks"),
    ("backend=mpi", "backend"),
    ("sparsity=dsl sparsity.density=0", "sparsity.density"),
    ("sparsity=dsl sparsity.density=1.5", "sparsity.density"),
    ("sparsity=dsl sparsity.delta_t=0", "sparsity.delta_t"),
    ("sparsity=dsl sparsity.zeta_0=1.2", "sparsity.zeta_0"),
    ("sparsity=dsl train.max_steps=100 sparsity.t_end=101", "sparsity.t_end"),
    ("sparsity=dsl sparsity.scope=everywhere", "sparsity.scope"),
    ("sparsity=dsl sparsity.growth_every=0", "sparsity.growth_every"),
    ("sparsity=dsl sparsity.init_mask=diagonal", "sparsity.init_mask"),
    ("sparsity=dsl sparsity.grow_init_std=-0.01", "sparsity.grow_init_std"),
    ("control.controller=zookeeper", "control.controller"),
    ("ray.num_workers=0", "ray.num_workers"),
    ("ray.cpus_per_worker=0", "ray.cpus_per_worker"),
    ("ray.storage_path=s3://bucket/runs", "ray.storage_path"),
    ("model.name=transformer", "model.name"),
    ("model=lightgcn model.lightgcn.num_layers=0", "model.lightgcn.num_layers"),
    ("model=lightgcn model.lightgcn.propagation=sampled", "model.lightgcn.propagation"),
    ("model=lightgcn model.lightgcn.max_neighbours=-1", "model.lightgcn.max_neighbours"),
    ("model=neumf model.neumf.gmf_dim=6", "model.neumf.gmf_dim"),
    ("model=neumf model.neumf.mlp_layers=[]", "model.neumf.mlp_layers"),
    ("model=multvae model.multvae.dropout=1", "model.multvae.dropout"),
    ("model=multvae model.multvae.anneal_steps=0", "model.multvae.anneal_steps"),
    ("train.dense_optimizer=lbfgs", "train.dense_optimizer"),
    ("train.dense_lr=-1", "train.dense_lr"),
])
def test_validation_names_the_key(override: str, key: str) -> None:
    cfg = load(*override.split())
    with pytest.raises(ConfigError, match=rf"^{key}="):
        cfg.validate()


@pytest.mark.parametrize("model", MODELS)
def test_every_model_is_a_config_group(model: str) -> None:
    cfg = load(f"model={model}")
    assert cfg.model.name == model
    cfg.validate()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fused Adam exists on CUDA")
def test_adam_is_refused_on_cpu() -> None:
    with pytest.raises(ConfigError, match=r"^train.optimizer='adam': FBGEMM on CPU"):
        load("train.optimizer=adam").validate()


EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("sparsity", ["dense", "dsl"])
def test_every_experiment_composes_and_validates(experiment: str, sparsity: str) -> None:
    """A renamed or mistyped key in a benchmark's config fails here, not in a benchmark run."""
    cfg = load(f"+experiment={experiment}", f"sparsity={sparsity}")
    cfg.validate()
    assert cfg.data.name in experiment


def test_the_experiments_are_found() -> None:
    assert {"mf_gowalla", "lightgcn_gowalla", "neumf_lastfm", "multvae_lastfm"} <= set(EXPERIMENTS)
