"""benchmarks/gpu_check.py's CPU rehearsal runs every step of the GPU check and writes its
figures: so that the one prepared command works when a GPU slot comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

TINY_TABLE_WEIGHTS = (200 + 100) * 16
"""The users' and items' tables of the rehearsal's data set (write_tiny_dataset) at dim 16."""


def test_cpu_rehearsal_runs_every_step_and_writes_sane_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["mode"] == "cpu"
    assert all(result["machine"][k] for k in ("device", "torch", "fbgemm", "torchrec"))
    tests = result["unit_tests"]
    assert tests["ok"] and tests["passed"] >= 3 and "failed" not in tests
    assert "DSL_TEST_DEVICE=cpu" in tests["command"] and "-m cuda" in tests["command"]

    runs = {(r["model"], r["method"]): r for r in result["runs"]}
    assert sorted(runs) == sorted((m, s) for m in ("mf", "lightgcn")
                                  for s in ("dense", "dsl", "block_dsl"))
    for (model, method), run in runs.items():
        assert run["ok"] and run["backend"] == "gloo" and run["world_size"] == 1, run
        assert run["samples_per_s_between_updates"] > 0
        assert run["memory"] == "peak_rss_mb" and all(mb > 0 for mb in run["peak_memory_mb"])
        assert 0 <= run["recall@20"] <= 1
        if method == "dense":
            assert run["updates"] == 0 and run["seconds_per_update"] is None
        else:  # 8 steps, delta_t=3: updates at 3 and 6
            assert run["updates"] == 2 and run["seconds_per_update"] > 0
            assert run["active"] == run["budget"] == round(0.2 * TINY_TABLE_WEIGHTS), run

    updates = {u["method"]: u for u in result["synthetic_update"]}
    assert sorted(updates) == ["block_dsl", "dsl"]
    for method, update in updates.items():
        assert update["ok"] and update["weights"] >= 1 << 16 and update["device"] == "cpu"
        assert update["active"] == update["budget"], update
        assert abs(update["budget"] - 0.2 * update["weights"]) <= 8  # a block of 8 at most
        assert update["moved"] > 0 and update["seconds"] > 0 and update["peak_rss_mb"] > 0
    assert result["cpu_seconds"] < 60  # CI's budget (wall time also counts others' load)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is")
def test_the_marked_tests_take_their_device_from_the_environment() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda",
                           "-p", "no:cacheprovider", "tests/test_fastops.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DSL_TEST_DEVICE": "cuda"})
    assert done.returncode != 0
    assert "DSL_TEST_DEVICE=cuda: torch sees no CUDA device" in done.stdout
