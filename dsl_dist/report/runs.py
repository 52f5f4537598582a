"""What the report reads of a run directory: its config, its events, its key figures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


class ReportError(ValueError):
    """A directory given to the report is not a run (the message names it)."""


def read_events(directory: Path) -> list[dict[str, Any]]:
    """The events of `directory`/metrics.jsonl, in the order the run wrote them."""
    metrics = directory / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{directory}: not a run directory (no metrics.jsonl)")
    return [json.loads(line) for line in metrics.read_text().splitlines() if line]


def last_event(directory: Path, event: str) -> dict[str, Any]:
    """The last `event` record of a run (e.g. its final "eval" or "update")."""
    found = [e for e in read_events(directory) if e["event"] == event]
    if not found:
        raise ReportError(f"{directory}: metrics.jsonl has no {event!r} event")
    return found[-1]


@dataclass
class Run:
    """One run directory: config.yaml and the events of metrics.jsonl."""

    directory: Path
    config: dict[str, Any]
    events: list[dict[str, Any]]

    @classmethod
    def load(cls, directory: Path) -> Run:
        metrics, config = directory / "metrics.jsonl", directory / "config.yaml"
        if not metrics.is_file() or not config.is_file():
            raise ReportError(f"{directory}: not a run directory (no metrics.jsonl and "
                              "config.yaml)")
        return cls(directory, OmegaConf.to_container(OmegaConf.load(config)),
                   read_events(directory))

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def label(self) -> str:
        """The run's name and what it trained, for legends."""
        sparsity = self.config["sparsity"]
        kind = ("dense" if sparsity["name"] == "dense"
                else f"{sparsity['name']} d={sparsity['density']:g}")
        return f"{self.name} ({self.config['model']['name']}, {kind})"

    @property
    def started(self) -> bool:
        """Whether the run trained a step (a run that failed before has nothing to show)."""
        return any("step" in e for e in self.events)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    def reported(self) -> list[dict[str, Any]]:
        """The evaluations of the reported split (eval.split), not those that select."""
        return [e for e in self.of("eval") if e["split"] == self.config["eval"]["split"]]

    def curve(self, metric: str) -> tuple[list[int], list[float]]:
        """(epochs trained, values) of `metric`: "loss", the mean training loss of every
        epoch, or an evaluation metric of the reported split (every eval.every_epochs and at
        the end)."""
        if metric == "loss":  # an epoch event names the epoch it trained, counted from 0
            points = [(e["epoch"] + 1, e["loss"]) for e in self.of("epoch")]
        else:
            points = [(e["epoch"], e[metric]) for e in self.reported() if metric in e]
        return [epoch for epoch, _ in points], [value for _, value in points]

    def key_figures(self) -> dict[str, str]:
        """The index's row: what ran, how fast, and where it ended."""
        epochs, evals, updates = self.of("epoch"), self.reported(), self.of("update")
        final = evals[-1] if evals else {}
        seconds = sum(e["seconds"] for e in epochs)
        samples = sum(e["samples_per_s"] * e["seconds"] for e in epochs)
        density = updates[-1]["density"] if updates else {}
        return {
            "run": self.name,
            "data": self.config["data"]["name"],
            "model": self.config["model"]["name"],
            "sparsity": self.config["sparsity"]["name"],
            "final density": ", ".join(f"{t} {d:.3f}" for t, d in density.items()) or "1",
            "steps": str(epochs[-1]["step"]) if epochs else "0",
            "train s": f"{seconds:.1f}",
            "samples/s": f"{samples / seconds:,.0f}" if seconds else "–",
            **{f"{name} ({final['split']})": f"{value:.4f}" for name, value in final.items()
               if "@" in name},
        }
