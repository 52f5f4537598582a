"""The explicit distributed context handed to every component that talks to other ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Rank, world size, device and process group of this training process."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    group: dist.ProcessGroup

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def broadcast_object(self, obj: T) -> T:
        """Returns rank 0's `obj` on every rank."""
        holder: list[Any] = [obj]
        dist.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]

    def all_gather_object(self, obj: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def main_then_broadcast(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on rank 0 only and returns its result on every rank.

        An exception on rank 0 is raised on every rank, so no rank is left waiting in a
        collective for a peer that has failed.
        """
        result: Optional[T] = None
        error: Optional[BaseException] = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # re-raised below, on every rank
                error = exc
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every rank, in place (same shape and dtype everywhere; bool is
        sent as bytes, which every backend carries)."""
        carried = tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor
        dist.broadcast(carried, src=0, group=self.group)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of `tensor` (a copy on this rank's device): the one reduction
        of counts and metrics."""
        out = tensor.to(self.device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def all_reduce_max(self, value: int) -> int:
        out = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return int(out.item())

    def all_reduce_min(self, value: int) -> int:
        return -self.all_reduce_max(-value)


def init_distributed(backend: str = "auto") -> DistContext:
    """Joins the process group described by the torchrun/Ray environment variables.

    Without them (a plain `python -m dsl_dist.train`) it forms a group of one, so the same
    sharded code path runs everywhere.
    """
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, store=_restarted_attempt_store(),
                                    rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    group = dist.group.WORLD
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                       backend=backend, group=group)


def _restarted_attempt_store() -> Optional[dist.Store]:
    """After torchrun restarted its workers (`--max-restarts`), a store for this attempt only.

    The restarted workers meet in the launcher's store, which still holds the keys of the
    attempt before, so the new group would try to connect to the dead workers' addresses
    (pytorch/pytorch#167288). Prefixing the keys with the restart count keeps attempts apart.
    None (the default env:// set-up) for a first attempt or outside torchrun.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False)
    return dist.PrefixStore(f"dsl-dist/attempt-{attempt}", store)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
