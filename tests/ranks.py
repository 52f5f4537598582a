"""Runs a function on N real processes joined in a gloo process group (no mocks)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], out_dir: str,
           args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    result = fn(*args)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    # The result is safe on disk: skip interpreter teardown, where native threads left by the
    # libraries occasionally abort ("terminate called without an active exception").
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, out_dir: Path, *args: Any) -> list[Any]:
    """Calls fn(*args) on `world_size` spawned ranks; returns each rank's JSON-able result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(world_size, free_port(), fn, str(out_dir), args), nprocs=world_size)
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]
