"""The run directory: one JSON line per event in metrics.jsonl, written by rank 0 only.

The run log is the one place that emits events; other sinks (the progress bar, TensorBoard)
receive the same events as they are written, so what they show matches metrics.jsonl by
construction.

A run claims its directory when it has trained its first step: until then its events wait in
memory and nothing is written, so a run that fails on its way there (a wrong data path, a
corrupt shard) leaves nothing that would refuse the corrected command or show up in reports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

if TYPE_CHECKING:
    from dsl_dist.config import JobConfig


class RunDirError(ValueError):
    """The run directory cannot be used without overwriting an earlier run."""


def run_dir_of(cfg: JobConfig) -> Path:
    """`run_dir`, or by default runs/<data>-<model>-<sparsity>-<time>."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / (f"{cfg.data.name}-{cfg.model.name}-{cfg.sparsity.name}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")


def started(metrics: Path) -> bool:
    """Whether the run of this metrics.jsonl has trained a step (an event carries one)."""
    if not metrics.is_file():
        return False
    with metrics.open() as f:
        return any('"step":' in line for line in f)


class Sink(Protocol):
    """Receives every event the run log writes (rank 0 only)."""

    def write(self, event: str, fields: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class RunLog:
    """Appends events to <run_dir>/metrics.jsonl; a no-op on ranks other than 0.

    As a checkpoint component it keeps how many events the log held: a run that resumes in
    place (`resuming_in_place`, a restarted job) cuts metrics.jsonl back to that, so that the
    events the resumed run writes again are not doubled."""

    def __init__(self, run_dir: Path, enabled: bool, config_yaml: str = "") -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.config_yaml = config_yaml
        """Written to <run_dir>/config.yaml when the run claims the directory."""
        self.resuming_in_place = False
        self.claimed = False
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self.sinks: list[Sink] = []
        self.echo: Callable[..., None] = print
        """Prints messages; a progress bar replaces it so that lines do not tear its bar."""

    def attach(self, sink: Sink) -> None:
        """Adds a sink for the events written from now on (ignored on ranks other than 0)."""
        if self.enabled:
            self.sinks.append(sink)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def state_dict(self) -> dict[str, Any]:
        return {"lines": self.lines()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.resuming_in_place:
            self.truncate(state["lines"])

    def check_free(self) -> None:
        """Refuses a directory that holds a run which has trained a step (one that has not,
        left by an earlier version, is taken over)."""
        if self.enabled and started(self.path):
            raise RunDirError(f"run_dir={str(self.run_dir)!r} already holds a run "
                              f"({self.path.name}); choose another run_dir")

    def claim(self) -> None:
        """At the run's first step: creates the run directory with config.yaml and
        metrics.jsonl holding the events so far (a restart resumes it from now on)."""
        if self.claimed:
            return
        self.claimed = True
        if not self.enabled:
            return
        self.check_free()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.config_yaml)
        self.path.write_text("")
        pending, self._pending = self._pending, []
        for event, fields in pending:
            self.write(event, **fields)

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
        if self.enabled and not self.claimed:
            self._pending.append((event, fields))
        elif self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"event": event, **fields}) + "\n")
            for sink in self.sinks:
                sink.write(event, fields)

    def print(self, message: str, *, file: Optional[Any] = None) -> None:
        if self.enabled:
            self.echo(message, file=file, flush=True)
