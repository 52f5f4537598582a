"""`dsl-dist train [--nproc N] OVERRIDES...`: N ranks on this machine, one line per mistake.

Before any rank starts, the config is composed and validated, the data prepared (and what the
model derives from it) and the run directory checked, once, in this process: a mistake there is
one line and exit status 2 with no rank started. The ranks are then started through
torch.distributed.run's API (elastic launch, as `torchrun --standalone` does) running
`python -m dsl_dist.train` with the same overrides, so a run is the same as under torchrun.

A mistake a rank finds later (a corrupt shard, a corrupt checkpoint) is reported by the first
rank that finds it through a file this launcher names (`ERROR_FILE_ENV`); the other ranks, whose
collectives fail once it exits, leave quietly (dsl_dist/cli.py), and this launcher prints the
line once and exits 2 instead of torchrun's report of every failed rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from dsl_dist.cli import BAD_INPUT, ERROR_FILE_ENV, exit_bad_input
from dsl_dist.config import JobConfig
from dsl_dist.config.compose import compose_job
from dsl_dist.data.prepare import ensure_prepared
from dsl_dist.model.registry import prepare_model_data
from dsl_dist.run_log import run_dir_of


def prepare(cfg: JobConfig) -> None:
    """Validates `cfg` and prepares its data (the ranks check the run directory: whether
    it resumes depends on its checkpoints, which rank 0 reads)."""
    cfg.validate()
    dataset_dir = Path(cfg.data.path)
    ensure_prepared(Path(cfg.data.source), dataset_dir, name=cfg.data.name,
                    num_shards=cfg.data.num_shards, seed=cfg.train.seed,
                    valid_fraction=cfg.data.valid_fraction)
    prepare_model_data(cfg, dataset_dir)


def launch(nproc: int, overrides: list[str], error_file: Path) -> int:
    """Runs `python -m dsl_dist.train overrides` on `nproc` local ranks; the exit status."""
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    os.environ[ERROR_FILE_ENV] = str(error_file)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: ranks share the cores
    # the agent's own records of a failure (rendezvous, "failed (exitcode: 2)") would repeat
    # what the ranks and this launcher say
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "dsl_dist.train", *overrides)
    except ChildFailedError as failure:
        if error_file.exists():
            print(f"error: {error_file.read_text()}", file=sys.stderr, flush=True)
            return 2
        rank, first = failure.get_first_failure()
        print(f"error: rank {rank} failed (exit code {first.exitcode}; its output is above)",
              file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="dsl-dist train", description=__doc__.splitlines()[0],
        epilog="OVERRIDES: Hydra overrides (KEY=VALUE, GROUP=OPTION), as for dsl_dist.train")
    parser.add_argument("--nproc", type=int, default=1, help="ranks (processes) to start")
    args, overrides = parser.parse_known_args(argv)
    if args.nproc < 1:
        exit_bad_input(ValueError(f"--nproc {args.nproc}: must be >= 1"))
    try:
        cfg = compose_job(overrides)
        prepare(cfg)
    except BAD_INPUT as exc:
        exit_bad_input(exc)
    if cfg.run_dir is None:  # the ranks would each name it after their own clock
        overrides = [*overrides, f"run_dir={run_dir_of(cfg)}"]
    with tempfile.TemporaryDirectory(prefix="dsl-dist-") as scratch:
        sys.exit(launch(args.nproc, overrides, Path(scratch) / "error"))
