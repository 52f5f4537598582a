"""Console entry points: a job function run on the config composed from `configs/` and the
command line's Hydra overrides (dsl_dist/config/compose.py)."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn, Optional

from dsl_dist.config import ConfigError, JobConfig
from dsl_dist.config.compose import CONFIG_DIR, compose_job
from dsl_dist.data.errors import DataError
from dsl_dist.run_log import RunDirError

BAD_INPUT = (ConfigError, DataError, RunDirError)
"""The errors a user's input causes, reported as one line and exit status 2."""

USAGE = f"""usage: {{prog}} [KEY=VALUE | GROUP=OPTION | +experiment=NAME ...]

Hydra overrides of the configuration in {CONFIG_DIR} (README.md, "Configuration")."""


def exit_bad_input(exc: Exception) -> NoReturn:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


def hydra_entry(job: Callable[[JobConfig], Any]) -> Callable[[Optional[list[str]]], None]:
    """The `main()` of a launcher: bad input (config, data, run directory) exits with status 2
    and a one-line message naming the problem."""

    def main(argv: Optional[list[str]] = None) -> None:
        argv = sys.argv[1:] if argv is None else argv
        if any(arg in ("-h", "--help") for arg in argv):
            print(USAGE.format(prog=os.path.basename(sys.argv[0])))
            return
        try:
            job(compose_job(argv))
        except BAD_INPUT as exc:
            exit_bad_input(exc)
        # Everything is written: leave without interpreter teardown, where native threads left
        # by the distributed libraries occasionally abort the process ("terminate called
        # without an active exception") and would turn a finished run into a failed one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return main
