"""Watching a run: the progress bar, TensorBoard's event files (read back with TensorBoard's
own reader) and `dsl-dist report`, on two short 2-rank runs on lastfm shared by the module."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard", reason="optional: TensorBoard event files")
pytest.importorskip("matplotlib", reason="optional: the report's figures")
from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, SHARED_DATA
from dsl_dist.checkpoint import fingerprint
from dsl_dist.progress import ProgressBar
from dsl_dist.report.index import main as report_main
from dsl_dist.report.rows import active_per_row
from dsl_dist.report.runs import Run
from test_config import load

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "lastfm").is_dir(),
                                reason="shared data not present")

SHORT = ["data.batch_size=2048", "model.embedding_dim=16", "train.epochs=2", "train.log_every=0",
         "train.progress_every_s=0.01", "eval.every_epochs=1", "eval.max_users=200",
         "sparsity.density=0.2", "sparsity.delta_t=4"]
RUNS = {"dsl": ["sparsity=dsl"],
        "block": ["sparsity=block_dsl", "sparsity.block.size=4", "model.sharding_type=row_wise"]}


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Each short run's directory and its stdout (not a terminal: plain progress lines)."""
    root = tmp_path_factory.mktemp("watch")
    done = {}
    for name, overrides in RUNS.items():
        run_dir = root / name
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "-m", "dsl_dist.train", f"data.source={SHARED_DATA / 'lastfm'}",
             f"data.path={root / 'lastfm'}", *SHORT, *overrides, f"run_dir={run_dir}"],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        done[name] = (run_dir, result.stdout)
    return done


@pytest.mark.multiprocess
def test_tensorboard_holds_the_values_of_metrics_jsonl(runs: dict) -> None:
    run_dir, _ = runs["dsl"]
    logged = events(run_dir)
    expected: dict[str, list[tuple[int, float]]] = {"train/loss": [], "train/samples_per_s": [],
                                                    "memory/epoch_peak_rss_mb": [],
                                                    "sparsity/active_over_budget": [],
                                                    "sparsity/zeta": []}
    for e in logged:
        if e["event"] == "epoch":
            expected["train/loss"].append((e["step"], e["loss"]))
            expected["train/samples_per_s"].append((e["step"], e["samples_per_s"]))
            expected["memory/epoch_peak_rss_mb"].append((e["step"], max(e["peak_rss_mb"])))
        elif e["event"] == "eval":
            for metric in ("recall@20", "ndcg@20"):
                expected.setdefault(f"eval/test/{metric}", []).append((e["step"], e[metric]))
        elif e["event"] == "update":
            expected["sparsity/active_over_budget"].append((e["step"], e["active"] / e["budget"]))
            expected["sparsity/zeta"].append((e["step"], e["fraction"]))
            for name in ("dropped", "grown", "regrown"):
                expected.setdefault(f"sparsity/{name}", []).append((e["step"], e[name]))
            for table, density in e["density"].items():
                expected.setdefault(f"sparsity/density/{table}", []).append((e["step"], density))
    assert len(expected["train/loss"]) == 2 and len(expected["eval/test/recall@20"]) == 2
    assert len(expected["sparsity/zeta"]) > 3 and "sparsity/density/item" in expected

    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # written by rank 0 only
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert set(expected) <= tags, set(expected) - tags
    for tag, values in expected.items():
        read = [(s.step, s.value) for s in accumulator.Scalars(tag)]
        # TensorBoard keeps float32
        assert read == [(step, float(np.float32(v))) for step, v in values], tag


@pytest.mark.multiprocess
def test_update_lines_carry_the_rss_each_update_started_from(runs: dict) -> None:
    """What an update's extra memory is measured against (benchmarks/memory.py), every rank's."""
    for run_dir, _ in runs.values():
        updates = [e for e in events(run_dir) if e["event"] == "update"]
        assert updates, run_dir
        for e in updates:
            assert len(e["rss_mb_before"]) == 2, e
            assert all(0 < before <= peak for before, peak in zip(e["rss_mb_before"],
                                                                   e["peak_rss_mb"])), e


@pytest.mark.multiprocess
def test_plain_progress_lines_without_a_terminal(runs: dict) -> None:
    _, stdout = runs["dsl"]
    lines = [line for line in stdout.splitlines() if re.match(r"epoch \d+ step \d+/\d+ ", line)]
    assert lines, stdout[-2000:]
    assert "samples/s" in lines[-1] and "ETA" in lines[-1] and "\r" not in stdout


@pytest.mark.multiprocess
def test_report_draws_every_run(runs: dict, tmp_path: Path) -> None:
    directories = [run_dir for run_dir, _ in runs.values()]
    out = tmp_path / "report"
    report_main([*map(str, directories), "--out", str(out)])
    index = (out / "index.md").read_text()
    pictures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", index)
    assert sorted(pictures) == sorted(p.name for p in out.glob("*.png"))
    assert len(pictures) == 1 + 2 * len(directories)  # curves; per run densities and rows
    for name in pictures:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) >= 300, name
    for run_dir in directories:
        assert f"| {run_dir.name} |" in index and str(run_dir) in index


@pytest.mark.multiprocess
def test_rows_read_from_the_checkpoint_add_up_to_the_last_update(runs: dict) -> None:
    """Read in one process what two ranks wrote: the active weights per row sum to the
    active count the last update reported."""
    for run_dir, _ in runs.values():
        run = Run.load(run_dir)
        counts = active_per_row(run)
        assert set(counts) == {"user", "item"}
        assert sum(int(c.sum()) for c, _ in counts.values()) == run.of("update")[-1]["active"]
        assert {width for _, width in counts.values()} == {16}


def test_plain_lines_are_spaced_and_name_the_update() -> None:
    stream = io.StringIO()
    bar = ProgressBar(samples_per_step=64, plain_every_s=3600, stream=stream)
    bar.start(epoch=0, done=0, total=10)
    bar.write("update", {"dropped": 12, "grown": 12})
    for _ in range(10):
        bar.step(0.5)
    bar.end()
    assert stream.getvalue() == ""  # nothing before an interval has passed
    bar.plain_every_s = 1e-9
    bar.start(epoch=1, done=4, total=10)
    bar.step(0.25)
    assert stream.getvalue().startswith("epoch 1 step 5/10 (50%), loss 0.2500, ")
    assert "update -12 +12" in stream.getvalue()


def test_watching_settings_do_not_change_the_fingerprint() -> None:
    """A run resumed with the bar or TensorBoard switched off continues its checkpoints."""
    assert fingerprint(load()) == fingerprint(load("train.progress=false",
                                                   "train.tensorboard=false",
                                                   "train.progress_every_s=5"))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_lines_above_it() -> None:
    stream = Terminal()
    bar = ProgressBar(samples_per_step=64, plain_every_s=30, stream=stream)
    bar.start(epoch=2, done=0, total=4)
    bar._shown = float("-inf")  # as if the last redraw were long ago
    bar.step(0.75)
    bar.print("checkpoint saved", file=stream)
    bar.end()
    drawn = stream.getvalue()
    assert "\r" in drawn and "epoch 2" in drawn and "loss 0.7500" in drawn
    assert "checkpoint saved\n" in drawn


def test_a_restart_appends_a_file_and_hides_what_it_writes_again(tmp_path: Path) -> None:
    """As a job resumed in place at step 5: the first file's later steps give way to the
    second file's."""
    from dsl_dist.tensorboard_log import TensorBoardSink

    def epochs(sink: TensorBoardSink, steps: range, loss: float) -> None:
        for step in steps:
            sink.write("epoch", {"epoch": step, "step": step, "loss": loss, "seconds": 1.0,
                                 "samples_per_s": 1.0, "peak_rss_mb": [1.0]})
        sink.close()

    epochs(TensorBoardSink(tmp_path), range(1, 9), 1.0)
    epochs(TensorBoardSink(tmp_path, purge_step=6), range(6, 8), 2.0)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert [(s.step, s.value) for s in accumulator.Scalars("train/loss")] == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 2.0), (7, 2.0)]
