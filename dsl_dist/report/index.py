"""`dsl-dist report RUN_DIR [RUN_DIR ...] --out DIR`: PNG figures of one or more runs and an
index.md that shows them under a table of the runs' key figures.

Figures: the learning curves of all runs overlaid (dense against DSL in one picture); per
sparse run, the density of each table and drop-and-grow against the step, and what DSL kept
at the end (active weights per row against the row's popularity, from the final checkpoint).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from dsl_dist.report import plots
from dsl_dist.report.rows import active_per_row, popularity
from dsl_dist.report.runs import ReportError, Run


def write_report(runs: list[Run], out: Path, k: int = 20) -> Path:
    """Writes every figure and index.md to `out`; returns index.md."""
    out.mkdir(parents=True, exist_ok=True)
    figures = [("Learning curves", plots.learning_curves(runs, k, out / "learning_curves.png"))]
    for run in runs:
        if run.of("update"):
            figures.append((f"{run.name}: density and drop-and-grow", plots.sparsity_over_time(
                run, out / f"{run.name}-sparsity.png")))
        active = active_per_row(run)
        if active:
            figures.append((f"{run.name}: active weights per row against popularity",
                            plots.rows_against_popularity(run, active, popularity(run),
                                                          out / f"{run.name}-rows.png")))
    rows = [run.key_figures() for run in runs]
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["# Runs", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "–") for c in columns) + " |" for row in rows]
    lines += ["", "Run directories: " + ", ".join(f"`{run.directory}`" for run in runs), ""]
    for title, path in figures:
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    index = out / "index.md"
    index.write_text("\n".join(lines))
    return index


def _refuse(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dsl-dist report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="where the figures go")
    parser.add_argument("--overwrite", action="store_true",
                        help="clear --out first if it exists (else it is refused)")
    parser.add_argument("--k", type=int, default=20, help="the cut-off of the curves' metrics")
    args = parser.parse_args(argv)
    try:
        runs = [Run.load(directory) for directory in args.runs]
    except ReportError as exc:
        _refuse(str(exc))
    for run in runs:
        if not run.started:
            print(f"skipping {run.directory}: it never trained a step", file=sys.stderr)
    runs = [run for run in runs if run.started]
    if not runs:
        _refuse("no run that trained a step")
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        _refuse(f"run directories must have distinct names (their figures' names): {names}")
    if args.out.exists() and not args.overwrite:
        _refuse(f"--out {args.out} exists; give --overwrite to replace it")
    if args.out.is_dir():
        shutil.rmtree(args.out)  # no stale figures of an earlier report
    elif args.out.exists():
        args.out.unlink()
    print(write_report(runs, args.out, args.k))
