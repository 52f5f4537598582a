"""Console entry points: a job function run on the config Hydra composes from `configs/` and
the command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from dsl_dist.config import ConfigError, JobConfig, register_configs
from dsl_dist.data.errors import DataError
from dsl_dist.run_log import RunDirError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The repository's Hydra configs, found from this file, not from the working directory (which
`ray job submit` replaces by a copy)."""


def hydra_entry(job: Callable[[JobConfig], Any]) -> Callable[[], None]:
    """The `main()` of a launcher: bad input (config, data, run directory) exits with status 2
    and a one-line message naming the problem."""

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def _hydra_main(dict_cfg: DictConfig) -> None:
        cfg: JobConfig = OmegaConf.to_object(dict_cfg)  # type: ignore[assignment]
        try:
            job(cfg)
        except (ConfigError, DataError, RunDirError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        register_configs()
        _hydra_main()
        # Everything is written: leave without interpreter teardown, where native threads left
        # by the distributed libraries occasionally abort the process ("terminate called
        # without an active exception") and would turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return main
