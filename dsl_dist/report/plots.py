"""The report's figures, each a PNG written by `matplotlib.figure.Figure` (no pyplot, so no
display and no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from dsl_dist.report.rows import side_of
from dsl_dist.report.runs import Run
from dsl_dist.sparsity.record import UpdateRecord

DPI = 120


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def learning_curves(runs: Sequence[Run], k: int, path: Path) -> Path:
    """The training loss of every epoch, and Recall@k and NDCG@k of every evaluation, against
    the epochs trained, all runs overlaid."""
    figure = Figure(figsize=(15, 4.2))
    splits = " / ".join(sorted({run.config["eval"]["split"] for run in runs}))
    panels = (("loss", "training loss (mean of the epoch)", "loss"),
              (f"recall@{k}", f"Recall@{k} on {splits}", f"recall@{k} (fraction)"),
              (f"ndcg@{k}", f"NDCG@{k} on {splits}", f"ndcg@{k} (fraction)"))
    for axes, (metric, title, ylabel) in zip(figure.subplots(1, 3), panels):
        for run in runs:
            axes.plot(*run.curve(metric), marker="o", label=run.label)
        axes.set(title=title, xlabel="epochs trained", ylabel=ylabel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize="small")
    return _save(figure, path)


def sparsity_over_time(run: Run, path: Path) -> Path:
    """Above: each table's density against the step, and the budget's. Below: ζ(t), the
    fraction of active weights an update may move, and what each update dropped, grew and
    regrew."""
    updates = [UpdateRecord.from_dict(u) for u in run.of("update")]
    steps = [u.step for u in updates]
    figure = Figure(figsize=(10, 7.5))
    top, bottom = figure.subplots(2, 1, sharex=True)
    for table in updates[0].density:
        top.plot(steps, [u.density[table] for u in updates], marker=".", label=table)
    top.axhline(run.config["sparsity"]["density"], color="grey", linestyle="--",
                label="target density (all tables)")
    top.set(title=f"{run.label}: density per table", ylabel="active / all weights")
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    for name, style in (("dropped", {"linewidth": 4, "alpha": 0.4}), ("grown", {}),
                        ("regrown", {})):  # as many grow as drop: the wide line shows both
        bottom.plot(steps, [getattr(u, name) for u in updates], marker=".", label=name, **style)
    bottom.set(title="drop-and-grow per update", xlabel="training step",
               ylabel="weights per update")
    bottom.grid(alpha=0.3)
    zeta = bottom.twinx()
    zeta.plot(steps, [u.fraction for u in updates], color="black", linestyle=":",
              label="ζ(t) (right axis)")
    zeta.set_ylabel("ζ(t): fraction of active weights moved")
    zeta.set_ylim(bottom=0)
    lines = bottom.get_legend_handles_labels()
    more = zeta.get_legend_handles_labels()
    bottom.legend(lines[0] + more[0], lines[1] + more[1], fontsize="small")
    return _save(figure, path)


def rows_against_popularity(run: Run, active: dict[str, tuple[np.ndarray, int]],
                            popularity: dict[str, np.ndarray], path: Path) -> Path:
    """Per sparsified table, one dot per row: its active weights at the end of the run
    against its interactions in train, with the mean per popularity bin."""
    tables = list(active)
    figure = Figure(figsize=(5.5 * len(tables), 4.5))
    for axes, table in zip(np.atleast_1d(figure.subplots(1, len(tables))), tables):
        (kept, cols), counts = active[table], popularity[side_of(table)]
        axes.scatter(counts + 1, kept, s=4, alpha=0.25, label="one row")
        edges = np.unique(np.geomspace(1, counts.max() + 2, 15).astype(int))
        bins = np.digitize(counts + 1, edges)
        means = [(np.exp(np.log(counts[bins == b] + 1).mean()), kept[bins == b].mean())
                 for b in np.unique(bins)]
        axes.plot(*zip(*means), color="red", marker="o", label="mean per popularity bin")
        _log_x(axes)
        axes.set(title=f"{run.name}: {table} table", xlabel=f"interactions of the {side_of(table)} "
                 "in train + 1 (log)", ylabel=f"active weights per row (of {cols})",
                 ylim=(-0.5, cols + 0.5))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", loc="upper left")
    return _save(figure, path)


def density_grid(rows: Sequence[dict], references: Sequence[dict], path: Path) -> Path:
    """Recall@20 against the density of the tables (active / all parameters), a line per
    data set and model; a dashed line marks each line's dense run and a cross each dense
    model of an equal budget (fewer embedding dimensions) among `references`."""
    figure = Figure(figsize=(10.5, 5.5))
    axes = figure.subplots()
    lines = sorted({(r["data"], r["model"]) for r in rows})
    for data, model in lines:
        mine = sorted((r["active"] / r["parameters"], r["recall@20"]) for r in rows
                      if (r["data"], r["model"]) == (data, model))
        (line,) = axes.plot(*zip(*mine), marker="o", label=f"{data} {model}")
        dense = [r for r in rows if (r["data"], r["model"], r["density"]) == (data, model, "dense")]
        for r in dense:
            axes.axhline(r["recall@20"], color=line.get_color(), linestyle="--", alpha=0.5)
        for r in references:
            if (r["data"], r["model"]) == (data, model):
                axes.scatter(r["density"], r["recall@20"], marker="x", s=60,
                             color=line.get_color())
    axes.plot([], [], color="grey", linestyle="--", label="dense run (same line's colour)")
    if references:
        axes.scatter([], [], marker="x", color="grey", label="dense, equal budget (smaller dim)")
    _log_x(axes)
    axes.set(title="DSL grid: Recall@20 against density", xlabel="density (active / all "
             "parameters, log)", ylabel="Recall@20 (fraction)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(figure, path)


def _log_x(axes: Axes) -> None:
    """A log x axis labelled 1, 2, 5, 10, ... instead of powers of ten."""
    axes.set_xscale("log")
    axis = axes.xaxis
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())
