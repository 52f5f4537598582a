"""The run directory: one JSON line per event in metrics.jsonl, written by rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional


class RunDirError(ValueError):
    """The run directory cannot be used without overwriting an earlier run."""


def default_run_dir(data: str, model: str, sparsity: str) -> Path:
    return Path("runs") / f"{data}-{model}-{sparsity}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunLog:
    """Appends events to <run_dir>/metrics.jsonl; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled

    def claim(self) -> None:
        """Creates the run directory and an empty metrics.jsonl, refusing a directory that
        already holds a run."""
        if not self.enabled:
            return
        if self.path.exists():
            raise RunDirError(f"run_dir={str(self.run_dir)!r} already holds a run "
                              f"({self.path.name}); choose another run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path.touch()  # the run exists from now on: a restart resumes it

    def lines(self) -> int:
        """Events written so far (0 on ranks other than 0)."""
        if not self.enabled or not self.path.exists():
            return 0
        with self.path.open() as f:
            return sum(1 for _ in f)

    def truncate(self, lines: int) -> None:
        """Keeps the first `lines` events: a resumed run writes the later ones again."""
        if self.enabled and self.path.exists():
            kept = self.path.read_text().splitlines(keepends=True)[:lines]
            self.path.write_text("".join(kept))

    def write(self, event: str, **fields: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"event": event, **fields}) + "\n")

    def print(self, message: str, *, file: Optional[Any] = None) -> None:
        if self.enabled:
            print(message, file=file, flush=True)
