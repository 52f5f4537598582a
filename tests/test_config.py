"""The Hydra configs compose onto the typed schema, and bad values are refused by key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from dsl_dist.config import (MODELS, SPARSITY_METHODS, ConfigError, DropAndGrowConfig,
                             JobConfig)
from dsl_dist.config.compose import compose_job, load_config


def load(*overrides: str) -> JobConfig:
    return compose_job(list(overrides))


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
    with pytest.raises(ConfigError, match="learning_rate"):
        load("train.learning_rate=1")
    with pytest.raises(ConfigError, match="epochs"):
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




@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fused Adam exists on CUDA")
def test_adam_is_refused_on_cpu() -> None:
    with pytest.raises(ConfigError, match=r"^train.optimizer='adam': FBGEMM on CPU"):
        load("train.optimizer=adam").validate()


EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("sparsity", list(SPARSITY_METHODS))
def test_every_experiment_composes_and_validates(experiment: str, sparsity: str) -> None:
    """A renamed or mistyped key in a benchmark's config fails here, not in a benchmark run."""
    if experiment.endswith("_dsl"):  # an experiment of one method
        sparsity = "dsl"
    cfg = load(f"+experiment={experiment}", f"sparsity={sparsity}")
    cfg.validate()
    assert cfg.data.name in experiment
    assert type(cfg.sparsity) is SPARSITY_METHODS[sparsity].schema


GROUPS = {"model": (MODELS, "mf"), "sparsity": (SPARSITY_METHODS, "dense")}
"""The groups whose schema the option chooses, and the option with no settings of its own."""


@pytest.mark.parametrize("group, name", [(g, n) for g, (table, _) in GROUPS.items()
                                         for n in table])
def test_each_option_carries_only_its_own_settings(group: str, name: str) -> None:
    """`<group>=<name>` composes that model's or method's schema: dense has no DSL field, MF
    no LightGCN section, and a setting another option has is refused by key."""
    table, plain = GROUPS[group]
    cfg = load(f"{group}={name}")
    cfg.validate()
    section = getattr(cfg, group)
    assert type(section) is table[name].schema and section.name == name
    fields = {f.name for f in dataclasses.fields(section)}
    assert (name == plain) == (fields == {f.name for f in dataclasses.fields(table[plain].schema)})
    foreign = {f.name for spec in table.values() for f in dataclasses.fields(spec.schema)} - fields
    assert foreign or len(table) == 1
    for key in sorted(foreign)[:3]:
        with pytest.raises(ConfigError, match=rf"^unknown config key '{group}.{key}'"):
            load(f"{group}={name}", f"{group}.{key}=1")


@pytest.mark.parametrize("group, other", [("model", "lightgcn"), ("sparsity", "dsl")])
def test_a_name_that_is_not_the_composed_option_is_refused(group: str, other: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{group}.name='{other}': names another option "
                                          rf".*choose it with {group}={other}$"):
        load(f"{group}.name={other}").validate()


def test_experiments_tune_each_method_apart() -> None:
    """An experiment's tuned settings follow the method chosen (configs/tuned/), with or
    without `+`; dense gets none."""
    dsl = load("+experiment=mf_gowalla", "sparsity=dsl").sparsity
    assert isinstance(dsl, DropAndGrowConfig)
    assert (dsl.delta_t, dsl.zeta_0, dsl.growth) == (150, 0.8, "accumulated")
    block = load("experiment=mf_gowalla", "sparsity=block_dsl").sparsity
    assert (block.delta_t, block.zeta_0, block.growth) == (150, 0.8, "accumulated")
    assert load("+experiment=mf_gowalla_dsl").sparsity.density == 0.2
    assert load("+experiment=multvae_lastfm", "sparsity=dsl").sparsity.dense_parameters == ["*"]
    assert load("+experiment=mf_gowalla").sparsity.name == "dense"


def test_a_saved_config_loads_in_its_models_and_methods_schemas(tmp_path: Path) -> None:
    for model, method in zip(MODELS, SPARSITY_METHODS):
        saved = tmp_path / f"{model}-{method}.yaml"
        composed = load(f"model={model}", f"sparsity={method}")
        saved.write_text(OmegaConf.to_yaml(OmegaConf.structured(composed)))
        assert load_config(saved) == composed
    for group, noun in (("model", "model"), ("sparsity", "method")):
        config = OmegaConf.structured(composed)
        config[group].name = "unheard_of"
        OmegaConf.save(config, saved)
        with pytest.raises(ConfigError, match=f"{group}.name='unheard_of' is not a known {noun}"):
            load_config(saved)


def test_the_experiments_are_found() -> None:
    assert {"mf_gowalla", "lightgcn_gowalla", "neumf_lastfm", "multvae_lastfm"} <= set(EXPERIMENTS)
