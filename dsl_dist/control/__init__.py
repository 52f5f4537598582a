"""Picks and connects the job's controller (see controller.py)."""

from __future__ import annotations

import os
import sys
from typing import Optional

from dsl_dist.config import ConfigError, ControlConfig
from dsl_dist.control.controller import SparsityController
from dsl_dist.distributed import DistContext
from dsl_dist.sparsity.base import Controller
from dsl_dist.sparsity.schedule import UpdateSchedule

RAY_NAMESPACE = "dsl-dist"
"""Namespace of the controller actors of torchrun jobs (Ray jobs use their own)."""


def ray_address(cfg: ControlConfig) -> Optional[str]:
    """The Ray cluster to use: `control.ray_address`, else the RAY_ADDRESS variable."""
    return cfg.ray_address or os.environ.get("RAY_ADDRESS")


def controller_kind(cfg: ControlConfig) -> str:
    """collective or ray: `auto` is ray inside a Ray job or when a Ray address is given.

    `auto` never imports ray itself: a Ray job's worker has imported it already (and connected),
    so a torchrun job on a machine without ray (a GPU image, say) still gets its controller."""
    if cfg.controller != "auto":
        return cfg.controller
    if ray_address(cfg):
        return "ray"
    ray = sys.modules.get("ray")
    return "ray" if ray is not None and ray.is_initialized() else "collective"


def connect_controller(cfg: ControlConfig, ctx: DistContext, schedule: UpdateSchedule,
                       budgets: list[int], unit: int = 1) -> Controller:
    """This rank's controller. Collective: a replica on every rank. Ray: rank 0 creates (or
    finds) the named actor, the other ranks find it after a barrier (collective: every rank
    calls this)."""
    if controller_kind(cfg) == "collective":
        return SparsityController(schedule, budgets, unit)
    import ray

    from dsl_dist.control.ray_controller import RayController, controller_actor

    if not ray.is_initialized():
        address = ray_address(cfg)
        if not address:
            raise ConfigError("control.controller=ray: no Ray cluster to connect to; set "
                              "control.ray_address or RAY_ADDRESS")
        ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False)
    namespace = ray.get_runtime_context().namespace
    session = ctx.broadcast_object(os.urandom(6).hex())
    name = cfg.actor_name or f"dsl-controller-{session}"
    if ctx.is_main:
        actor = controller_actor(name, namespace)
    ctx.barrier()
    if not ctx.is_main:
        actor = ray.get_actor(name, namespace=namespace)
    return RayController(actor, session, schedule, budgets, unit, ctx.world_size, ctx.is_main)
