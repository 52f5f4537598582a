"""Ray entry point: `ray job submit --working-dir . -- python -m dsl_dist.ray_train <overrides>`.

The driver runs the training loop of `dsl_dist.train` in a Ray Train `TorchTrainer` with
`ray.num_workers` workers (gloo on CPU; NCCL, one GPU each, with `ray.use_gpu=true`). It
creates the sparsity controller as a named actor itself, so the controller outlives any worker
(a dense run never uses it), and every evaluation is reported through Ray Train. Runs are kept under
`ray.storage_path` (default ~/dsl-dist, printed at start), not in the working directory, which
`ray job submit` copies to a temporary place. On a cluster of several nodes, give
`data.source`, `data.path` and `ray.storage_path` on storage every node sees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dsl_dist.cli import hydra_entry
from dsl_dist.config import JobConfig
from dsl_dist.control import controller_kind, ray_address
from dsl_dist.control.ray_controller import controller_actor
from dsl_dist.run_log import run_dir_of
from dsl_dist.train import build_trainer


def _report(metrics: dict[str, float]) -> None:
    """Reports an evaluation to Ray Train from every worker. Ray Train keeps only metrics that
    come with a checkpoint, so rank 0 attaches them as one (metrics.json) under
    `ray.storage_path`."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: a rank of the same trainer torchrun runs (Ray Train has already
    formed the process group and owns its teardown)."""
    # Ray Train shows a worker's INFO records, where TorchRec and FBGEMM describe every plan,
    # table and kernel they build (about 100 lines a worker); torchrun shows warnings only
    logging.getLogger().setLevel(logging.WARNING)
    build_trainer(config["job"]).fit(report=_report)


def _local_path(path: str) -> str:
    """Absolute, so workers whose working directory differs resolve it alike; URIs as given."""
    return path if "://" in path else str(Path(path).resolve())


def run_on_ray(cfg: JobConfig) -> dict[str, Any]:
    """Trains on the Ray cluster of RAY_ADDRESS (`control.ray_address`, else a local one);
    returns the final metrics."""
    cfg.validate()
    if not ray.is_initialized():
        # inside `ray job submit` RAY_ADDRESS names the cluster; without one, a private
        # single-machine instance
        address = ray_address(cfg.control)
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False)
    storage = Path(cfg.ray.storage_path).expanduser().resolve()
    run_dir = storage / run_dir_of(cfg)  # an absolute run_dir stays as it is
    print(f"storage_path {storage}: run_dir {run_dir}", flush=True)
    data = dataclasses.replace(cfg.data, source=_local_path(cfg.data.source),
                               path=_local_path(cfg.data.path))
    control = cfg.control
    if controller_kind(control) == "ray":
        # created by the driver, which outlives the workers (a dense run never connects)
        name = control.actor_name or f"dsl-controller-{run_dir.name}"
        controller_actor(name, ray.get_runtime_context().namespace)
        control = dataclasses.replace(control, controller="ray", actor_name=name)
    # Ray Train's workers otherwise send every print through a logger as well as to stdout,
    # which shows rank 0's lines twice in the job's log (the driver passes this to them)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    backend = "nccl" if cfg.ray.use_gpu else "gloo"
    job = dataclasses.replace(cfg, data=data, control=control, run_dir=str(run_dir),
                              backend=backend)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=run_dir.name, storage_path=str(storage / "ray_train"),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    result = trainer.fit()
    print(f"final metrics: {result.metrics}", flush=True)
    return result.metrics


main = hydra_entry(run_on_ray)


if __name__ == "__main__":
    main()
