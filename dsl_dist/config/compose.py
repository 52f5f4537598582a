"""Hydra composition of `configs/` and the command line's overrides into a checked JobConfig.

Hydra refuses an unknown key only without `+`, in several lines; with `+` (which its own hint
suggests) the key is added and OmegaConf drops it when it builds the dataclasses, so a typo
would train with the default. Here every key outside the schema is refused either way, in one
line naming the key and the nearest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Iterator, Optional

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from dsl_dist.config import MODELS, SPARSITY_METHODS, ConfigError, JobConfig, register_configs

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The repository's Hydra configs, found from this file, not from the working directory (which
`ray job submit` replaces by a copy)."""


def unknown_key_message(full_key: str, schema: Optional[type]) -> str:
    """`unknown config key 'train.epoch' (did you mean 'train.epochs'?)`."""
    section, _, name = full_key.rpartition(".")
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) \
        else []
    nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    where = f"{section}." if section else ""
    hint = (f"did you mean {where + nearest[0]!r}?" if nearest else
            f"known keys{' of ' + section if section else ''}: {', '.join(known)}")
    return f"unknown config key {full_key!r} ({hint})"


def unknown_keys(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(full key, its section's schema) of every key the schema does not declare; the keys of
    dict-typed fields (e.g. model.table_sharding) are free."""
    schema = OmegaConf.get_type(node)
    declared = ({f.name for f in dataclasses.fields(schema)}
                if dataclasses.is_dataclass(schema) else None)
    for key in node.keys():
        full_key = f"{prefix}{key}"
        if declared is not None and key not in declared:
            yield full_key, schema
        elif isinstance(node._get_node(key), DictConfig) and not OmegaConf.is_missing(node, key):
            yield from unknown_keys(node[key], f"{full_key}.")


def _one_line(exc: BaseException) -> str:
    """Hydra's message and its cause's first line (OmegaConf's reason), as one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = str(exc.__cause__ or "").strip().splitlines()
    return "; ".join(lines + cause[:1])


def _missing_option(exc: MissingConfigException) -> str:
    """`In 'config': Could not find 'sparsity/dsll' (options: block_dsl, dense, dsl)`."""
    first, *rest = str(exc).split("Config search path")[0].strip().splitlines()
    options = [line.strip() for line in rest if line.startswith(("\t", " "))]
    return first + (f" (options: {', '.join(options)})" if options else "")


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed config, or ConfigError in one line (an unknown key, group option or
    value). `+experiment=X` (Hydra's form for a group the primary config does not list, which
    the benchmarks record) is taken as `experiment=X`: configs/config.yaml lists the group, so
    that the settings an experiment tuned for the chosen method (configs/tuned/) follow it."""
    register_configs()
    overrides = [o[1:] if o.startswith("+experiment=") else o for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose("config", overrides=overrides)
    except MissingConfigException as exc:
        raise ConfigError(_missing_option(exc)) from None
    except HydraException as exc:
        cause = exc.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
            raise ConfigError(unknown_key_message(cause.full_key, cause.object_type)) from None
        raise ConfigError(_one_line(exc)) from None
    for full_key, schema in unknown_keys(composed):
        raise ConfigError(unknown_key_message(full_key, schema))
    return composed


def compose_job(overrides: list[str]) -> JobConfig:
    """The JobConfig of `overrides` (Hydra syntax), composed and checked but not validated."""
    try:
        return OmegaConf.to_object(compose_config(overrides))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None


def load_config(path: Path) -> JobConfig:
    """A run's saved config.yaml as the typed JobConfig, its model and sparsity sections in the
    schemas of the model and the method they name (ConfigError in one line)."""
    try:
        saved = OmegaConf.load(path)
        schemas = {}
        for group, table, default, noun in (("model", MODELS, "mf", "model"),
                                            ("sparsity", SPARSITY_METHODS, "dense", "method")):
            name = OmegaConf.select(saved, f"{group}.name", default=default)
            if name not in table:
                raise ConfigError(f"{path}: {group}.name={name!r} is not a known {noun} "
                                  f"({', '.join(table)})")
            schemas[group] = table[name].schema(name=name)
        schema = OmegaConf.structured(JobConfig(**schemas))
        return OmegaConf.to_object(OmegaConf.merge(schema, saved))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_one_line(exc)}") from None
