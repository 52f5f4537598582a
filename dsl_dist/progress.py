"""Rank 0's live view of an epoch: a tqdm bar on a terminal, plain lines elsewhere.

On a terminal the bar shows steps done / total, ETA, the loss, samples/s and the last
drop-and-grow's counts, redrawn a few times a second at most. Without one (CI, `ray job
submit` logs, Kubernetes) control characters would only clutter the log, so a plain line is
printed every `train.progress_every_s` seconds instead. Both are fed per step by the trainer
and, as a run log sink, by the update events.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Optional, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

REFRESH_S = 0.25
"""The bar is redrawn at most this often: a step costs a clock read, nothing more."""


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressBar:
    """One epoch at a time: `start`, a `step` per training step, `end`."""

    def __init__(self, samples_per_step: int, plain_every_s: float,
                 stream: Optional[TextIO] = None) -> None:
        self.samples_per_step = samples_per_step
        self.stream = stream or sys.stdout
        self.plain_every_s = plain_every_s if not self.stream.isatty() else None
        """None: draw a bar (the stream is a terminal)."""
        self.last_update: Optional[tuple[int, int]] = None
        self._bar: Optional[tqdm] = None
        self._epoch, self._done, self._total, self._first = 0, 0, 0, 0
        self._started = self._shown = 0.0
        self._loss: Any = float("nan")

    def write(self, event: str, fields: dict[str, Any]) -> None:
        """Run log sink: keeps the dropped/grown counts of the latest update."""
        if event == "update":
            self.last_update = (fields["dropped"], fields["grown"])

    def start(self, epoch: int, done: int, total: int) -> None:
        """An epoch of `total` steps begins, `done` of them already trained (a resume)."""
        self._epoch, self._done, self._total, self._first = epoch, done, total, done
        self._started = self._shown = time.monotonic()
        if self.plain_every_s is None:
            from tqdm import tqdm  # only for a terminal: GPU images may lack it

            self._bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", unit="step",
                             file=self.stream, leave=False, dynamic_ncols=True,
                             mininterval=REFRESH_S)

    def step(self, loss: Any) -> None:
        """One more step done; `loss` (a float or a 0-d tensor, read only when shown)."""
        self._done += 1
        self._loss = loss
        now = time.monotonic()
        if self.plain_every_s is None:
            if now - self._shown >= REFRESH_S and self._bar is not None:
                self._bar.set_postfix_str(self._figures(now), refresh=False)
                self._bar.update(self._done - self._bar.n)
                self._shown = now
        elif now - self._shown >= self.plain_every_s:
            self.stream.write(f"epoch {self._epoch} step {self._done}/{self._total} "
                              f"({self._done / max(self._total, 1):.0%}), "
                              f"{self._figures(now)}, ETA {_duration(self._eta(now))}\n")
            self.stream.flush()
            self._shown = now

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.end()

    def print(self, message: str, *, file: Optional[TextIO] = None, flush: bool = True) -> None:
        """Prints a line above the bar instead of through it."""
        if self._bar is not None:
            self._bar.write(message, file=file or self.stream)
        else:
            print(message, file=file, flush=flush)

    def _eta(self, now: float) -> float:
        trained = self._done - self._first
        return (self._total - self._done) * (now - self._started) / max(trained, 1)

    def _figures(self, now: float) -> str:
        rate = (self._done - self._first) * self.samples_per_step / max(now - self._started,
                                                                         1e-9)
        text = f"loss {float(self._loss):.4f}, {rate:,.0f} samples/s"
        if self.last_update is not None:
            dropped, grown = self.last_update
            text += f", update -{dropped:,} +{grown:,}"
        return text
