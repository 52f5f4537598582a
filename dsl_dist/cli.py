"""Console entry points: a job function run on the config composed from `configs/` and the
command line's Hydra overrides (dsl_dist/config/compose.py)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, NoReturn, Optional

from dsl_dist.checkpoint import CheckpointError
from dsl_dist.config import ConfigError, JobConfig
from dsl_dist.config.compose import CONFIG_DIR, compose_job
from dsl_dist.data.errors import DataError
from dsl_dist.run_log import RunDirError

BAD_INPUT = (ConfigError, DataError, RunDirError, CheckpointError)
"""The errors a user's input causes (a checkpoint to resume from included), reported as one
line and exit status 2."""

USAGE = f"""usage: {{prog}} [KEY=VALUE | GROUP=OPTION | +experiment=NAME ...]

Hydra overrides of the configuration in {CONFIG_DIR} (README.md, "Configuration")."""


ERROR_FILE_ENV = "DSL_DIST_ERROR_FILE"
"""Set by `dsl-dist train` (dsl_dist/launch.py) for its ranks: the first rank to find a
mistake writes its line there, for the launcher to print once."""

QUIET_EXIT_WAIT_S = 5.0
"""Under the launcher, how long a rank that failed otherwise (a collective whose peer has
exited) waits for a peer's report before it calls its failure its own."""


def exit_bad_input(exc: Exception) -> NoReturn:
    """Exits with status 2 after the one-line message: printed here, or under the launcher
    written to its error file if no rank has written one yet."""
    error_file = os.environ.get(ERROR_FILE_ENV)
    if error_file is None:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    else:
        try:
            with open(error_file, "x") as f:
                f.write(str(exc))
        except FileExistsError:
            pass
    _leave(2)


def _leave(status: int) -> NoReturn:
    """Exits without interpreter teardown, where native threads left by the distributed
    libraries occasionally abort the process ("terminate called without an active
    exception"), which would add a line and turn a finished run into a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _reported_by_a_peer() -> bool:
    """Under the launcher: whether another rank reported a mistake (this rank's failure then
    follows from that rank's exit)."""
    error_file = os.environ.get(ERROR_FILE_ENV)
    deadline = time.monotonic() + QUIET_EXIT_WAIT_S
    while error_file is not None and time.monotonic() < deadline:
        if os.path.exists(error_file):
            return True
        time.sleep(0.1)
    return False


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
        except Exception:
            if _reported_by_a_peer():
                _leave(2)
            raise
        _leave(0)

    return main
