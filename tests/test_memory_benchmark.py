"""benchmarks/memory.py's figures from a run's metrics.jsonl, on CPU and as a CUDA run logs
them (per-rank peaks of allocated device memory), in the form the GPU check reads."""

from __future__ import annotations

import json
from pathlib import Path

from gpu_steps import memory_runs
from memory import figures, rows_of


def write_metrics(run_dir: Path, cuda: bool) -> None:
    """Two ranks, two epochs, one update, one evaluation; CUDA peaks where `cuda`."""
    def peaks(rss: list[float], device: list[float]) -> dict:
        return {"peak_rss_mb": rss, **({"peak_cuda_mb": device} if cuda else {})}

    events = [
        {"event": "memory", "table_bytes": 400, "optimizer_bytes": 8, "sparsity_bytes": 40,
         "weights": 100, "baseline_rss_mb": [300.0, 310.0]},
        {"event": "epoch", "seconds": 2.0, "samples_per_s": 1000.0, **peaks([500, 520], [90, 80])},
        {"event": "update", "seconds": 0.5, "rss_mb_before": [480, 500],
         **peaks([530, 515], [120, 85])},
        {"event": "epoch", "seconds": 2.0, "samples_per_s": 1000.0, **peaks([505, 525], [95, 82])},
        {"event": "eval", "recall@20": 0.1, **peaks([600, 610], [100, 130])}]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")


def test_a_cuda_run_reports_each_ranks_peak_of_device_memory(tmp_path: Path) -> None:
    write_metrics(tmp_path / "cuda", cuda=True)
    row, scale = rows_of(figures(tmp_path / "cuda"), "block_dsl", 0.2, "cuda")
    assert row["peak_cuda_mb"] == [120, 130]  # the update's on rank 0, evaluation's on 1
    assert row["peak_rss_mb"] == [600, 610]
    assert scale["weights_per_rank"] == 50 and scale["update_extra_rss_mb"] == [50, 15]
    read = memory_runs(json.dumps(row))
    assert [(r["method"], r["peak_cuda_mb"]) for r in read] == [("block_dsl", [120, 130])]


def test_a_cpu_run_has_no_device_peak(tmp_path: Path) -> None:
    write_metrics(tmp_path / "cpu", cuda=False)
    row, _ = rows_of(figures(tmp_path / "cpu"), "dsl", 0.2, "cpu")
    assert "peak_cuda_mb" not in row and row["device"] == "cpu"
    assert row["samples_per_s_between_updates"] == 4000 / 3.5
