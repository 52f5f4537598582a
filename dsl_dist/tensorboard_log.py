"""TensorBoard event files under <run_dir>/tensorboard, fed by the run log's events.

`scalars` maps each metrics.jsonl event to TensorBoard scalars at the event's training step,
so the values are those of metrics.jsonl. Every process that writes opens a new event file
(TensorBoard reads all of a directory's files as one run), so a restarted job appends; it
also hides the earlier files' events after the step it resumed from, which it writes again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

MAX_QUEUE = 1000
"""Scalars queued for the writer's thread: a queue that fills makes training wait for disk."""
FLUSHED_AFTER = ("epoch", "eval")
"""Events after which the file is flushed, so a crash loses at most one epoch's updates."""


def scalars(event: str, fields: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The (tag, value) pairs of one run log event (see dsl_dist/train.py for the events)."""
    if event == "memory":
        for kind in ("table", "optimizer", "sparsity"):
            yield f"memory/{kind}_bytes", fields[f"{kind}_bytes"]
        yield "memory/baseline_rss_mb", max(fields["baseline_rss_mb"])
    elif event == "epoch":
        yield "train/loss", fields["loss"]
        yield "train/samples_per_s", fields["samples_per_s"]
        yield "train/epoch_seconds", fields["seconds"]
        yield "train/epoch", fields["epoch"]
        yield "memory/epoch_peak_rss_mb", max(fields["peak_rss_mb"])
    elif event == "eval":
        yield f"eval/{fields['split']}/seconds", fields["seconds"]
        yield "memory/eval_peak_rss_mb", max(fields["peak_rss_mb"])
        for name, value in fields.items():
            if "@" in name or name == "users":
                yield f"eval/{fields['split']}/{name}", value
    elif event == "update":
        yield "sparsity/active_over_budget", fields["active"] / fields["budget"]
        yield "sparsity/zeta", fields["fraction"]
        for name in ("active", "dropped", "grown", "regrown"):
            yield f"sparsity/{name}", fields[name]
        yield "sparsity/update_seconds", fields["seconds"]
        for table, density in fields["density"].items():
            yield f"sparsity/density/{table}", density
        yield "memory/update_peak_rss_mb", max(fields["peak_rss_mb"])


class TensorBoardSink:
    """A run log sink writing `scalars` of every event to a new event file in `directory`,
    created at the first event (the run log sends none before the run's first step, so a run
    that never trained leaves no event file)."""

    def __init__(self, directory: Path, purge_step: Optional[int] = None) -> None:
        self.directory, self.purge_step = directory, purge_step
        self.writer: Optional[SummaryWriter] = None

    def write(self, event: str, fields: dict[str, Any]) -> None:
        if self.writer is None:
            # imported here: only a run that writes event files needs tensorboard
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.directory), max_queue=MAX_QUEUE,
                                        purge_step=self.purge_step)
        step = fields.get("step", 0)
        for tag, value in scalars(event, fields):
            self.writer.add_scalar(tag, value, step)
        if event in FLUSHED_AFTER:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
