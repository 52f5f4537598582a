"""Checkpoints resume exactly: after a killed worker (torchrun --max-restarts), on another world
size (DCP resharding), and from the previous checkpoint when the newest is corrupt; a
checkpoint of other settings is refused. All with real processes on lastfm."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import REPO, SHARED_DATA
from test_launchers import environment, record, torchrun

BASE = ["sparsity=dsl", "sparsity.density=0.2", "sparsity.delta_t=5", "train.max_steps=30",
        "checkpoint.every=10", "checkpoint.keep=3", "model.sharding_type=row_wise"]


def data(prepared: Path) -> list[str]:
    return [f"data.source={SHARED_DATA / 'lastfm'}", f"data.path={prepared}"]


def tensors(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, whole (as one process sees it), by flat key."""
    out = scratch / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        elif isinstance(node, torch.Tensor):
            flat[prefix.rstrip(".")] = node

    walk("", torch.load(out, weights_only=True))
    return flat


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, different


def final_checkpoint(run_dir: Path) -> Path:
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert json.loads((newest / "trainer.json").read_text())["finished"]
    return newest


def single_process(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsl_dist.train", *overrides], cwd=REPO,
                          env=environment(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoint") / "lastfm"


@pytest.fixture(scope="module")
def base_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks, 30 steps, checkpoints at steps 10, 20 and 30 (the final one)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train", *data(prepared),
             *BASE, f"run_dir={run_dir}", env=environment())
    names = [p.name for p in sorted((run_dir / "checkpoints").iterdir())]
    assert names == ["step-000000010", "step-000000020", "step-000000030"]
    return run_dir


@pytest.mark.multiprocess
def test_resume_on_another_world_size_keeps_everything(base_run: Path, prepared: Path,
                                                       tmp_path: Path) -> None:
    saved = final_checkpoint(base_run)
    one = tmp_path / "one"
    done = single_process(*data(prepared), *BASE, f"checkpoint.resume={saved}", f"run_dir={one}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved by 2 rank(s)" in done.stdout
    assert "ShardedTensor" not in done.stderr  # DCP's warning on TorchRec's tables, filtered
    two = tmp_path / "two"
    torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train", *data(prepared),
             *BASE, f"checkpoint.resume={final_checkpoint(one)}", f"run_dir={two}",
             env=environment())

    original = tensors(saved, tmp_path)
    assert any(key.startswith("sparsity.") and key.endswith(".mask") for key in original)
    assert any(key.startswith("optimizer.") for key in original)
    assert_same_tensors(original, tensors(final_checkpoint(one), tmp_path))  # 2 -> 1 rank
    assert_same_tensors(original, tensors(final_checkpoint(two), tmp_path))  # 1 -> 2 ranks
    budget = record(base_run)["update"][-1]["budget"]
    assert sum(int(t.sum()) for k, t in original.items() if k.endswith(".mask")) == budget
    histories = [json.loads((c / "trainer.json").read_text())["controller"]["history"]
                 for c in (saved, final_checkpoint(one), final_checkpoint(two))]
    assert histories[0] and histories[0] == histories[1] == histories[2]


@pytest.mark.multiprocess
def test_checkpoint_of_other_settings_is_refused(base_run: Path, prepared: Path,
                                                 tmp_path: Path) -> None:
    saved = final_checkpoint(base_run)
    before = (saved / "trainer.json").read_text()
    done = single_process(*data(prepared), *BASE, "sparsity.density=0.3",
                          f"checkpoint.resume={saved}", f"run_dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert "sparsity.density=0.2 (this run: 0.3)" in done.stderr
    assert (saved / "trainer.json").read_text() == before


@pytest.mark.multiprocess
def test_corrupt_newest_checkpoint_falls_back_and_resumes_exactly(base_run: Path,
                                                                  prepared: Path,
                                                                  tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-000000030")  # as if the job died before the end
    (checkpoints / ".step-000000025.partial").mkdir()  # and mid-save once
    shard = checkpoints / "step-000000020" / "__1_0.distcp"
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))

    done = torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train",
                    *data(prepared), *BASE, f"run_dir={run_dir}", env=environment())
    assert "__1_0.distcp does not match its checksum" in done.stderr
    assert f"resumed from {checkpoints / 'step-000000010'} at step 10" in done.stdout
    assert record(run_dir) == record(base_run)
    assert_same_tensors(tensors(final_checkpoint(base_run), tmp_path),
                        tensors(final_checkpoint(run_dir), tmp_path))


def workers_of(launcher: subprocess.Popen) -> list[int]:
    """PIDs of the training processes a torchrun launcher started."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == launcher.pid and b"dsl_dist.train" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.multiprocess
def test_killed_worker_is_restarted_by_torchrun_and_resumes_exactly(prepared: Path,
                                                                    tmp_path: Path) -> None:
    overrides = [*data(prepared), "sparsity=dsl", "sparsity.density=0.2",
                 "sparsity.delta_t=20", "data.batch_size=256", "train.epochs=3",
                 "checkpoint.every=40", "model.sharding_type=row_wise"]
    reference = tmp_path / "reference"
    torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train", *overrides,
             f"run_dir={reference}", env=environment())

    run_dir = tmp_path / "restarted"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--max-restarts", "1", "-m", "dsl_dist.train", *overrides, f"run_dir={run_dir}"],
        cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint"
        time.sleep(0.05)
    os.kill(workers_of(launcher)[-1], signal.SIGKILL)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert "resumed from" in out, "the run ended before the kill"
    assert record(run_dir) == record(reference)
    assert all(u["active"] == u["budget"] for u in record(run_dir)["update"])
    assert_same_tensors(tensors(final_checkpoint(reference), tmp_path),
                        tensors(final_checkpoint(run_dir), tmp_path))
