"""A user's mistakes are one line naming them, exit 2, whatever the launcher: a key outside the
schema (with or without `+`: Hydra itself adds a `+key` silently), a wrong data path, a corrupt
shard, a corrupt checkpoint, an existing report, a busy port. A run that fails before its
first step leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, write_clustered_dataset
from dsl_dist.config import ConfigError
from dsl_dist.config.compose import compose_job
from dsl_dist.report.runs import Run


def dsl_dist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsl_dist.commands", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(0o022))


def refusal(done: subprocess.CompletedProcess) -> str:
    """The one line a refused command printed: exit 2, no traceback, nothing else on
    stderr."""
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stdout
    return lines[0]


@pytest.mark.parametrize("override", ["train.epoch=1", "+train.epoch=1"])
def test_a_typo_is_refused_naming_the_nearest_key(override: str) -> None:
    with pytest.raises(ConfigError) as refused:
        compose_job([override])
    assert str(refused.value) == ("unknown config key 'train.epoch' "
                                  "(did you mean 'train.epochs'?)")


def test_known_keys_compose() -> None:
    assert compose_job(["train.epochs=3"]).train.epochs == 3


@pytest.mark.parametrize("launcher", [["-m", "dsl_dist.commands", "train", "--nproc", "2"],
                                      ["-m", "dsl_dist.train"]])
def test_every_launcher_reports_a_typo_in_one_line_with_exit_2(launcher: list[str]) -> None:
    done = subprocess.run([sys.executable, *launcher, "+train.epoch=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'train.epoch'" in lines[0] and "train.epochs" in lines[0], lines


@pytest.mark.parametrize("launcher", [["-m", "dsl_dist.commands", "train", "--nproc", "2"],
                                      ["-m", "dsl_dist.train"]])
def test_a_wrong_data_path_is_one_line_and_leaves_no_run(launcher: list[str],
                                                         tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, *launcher, f"data.source={tmp_path / 'nowhere'}",
                           f"data.path={tmp_path / 'prepared'}", f"run_dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert f"{tmp_path / 'nowhere'}: no such directory" in refusal(done)
    assert not run_dir.exists()


# The rest train a small data set on 2 ranks, as a user would.

TRAIN = ["data.batch_size=32", "train.epochs=5", "model.embedding_dim=16"]


def train_overrides(prepared: Path, run_dir: Path) -> list[str]:
    return [f"data.source={prepared.parent / 'source'}", f"data.path={prepared}", *TRAIN,
            f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mistakes")
    write_clustered_dataset(root / "source")
    done = subprocess.run([sys.executable, "-m", "dsl_dist.data.prepare", "--source",
                           str(root / "source"), "--out", str(root / "prepared")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return root / "prepared"


def flip_a_byte(path: Path) -> bytes:
    """Corrupts `path` in its middle; returns its original bytes."""
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


@dataclass
class FirstTry:
    """The same command twice: with the last train shard corrupt, then, the shard restored,
    to the end."""

    shard: Path
    failed: subprocess.CompletedProcess
    left_behind: bool
    """Whether the failed run left its run directory."""
    run_dir: Path


@pytest.fixture(scope="module")
def first_try(prepared: Path) -> FirstTry:
    run_dir = prepared.parent / "run"
    command = ["train", "--nproc", "2", *train_overrides(prepared, run_dir),
               "checkpoint.every=20"]
    shard = sorted((prepared / "train").glob("*.parquet"))[-1]
    original = flip_a_byte(shard)
    try:
        failed = dsl_dist(*command)
    finally:
        shard.write_bytes(original)
    left_behind = run_dir.exists()
    rerun = dsl_dist(*command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return FirstTry(shard, failed, left_behind, run_dir)


@pytest.fixture(scope="module")
def finished_run(first_try: FirstTry) -> Path:
    return first_try.run_dir


@pytest.mark.multiprocess
def test_a_corrupt_shard_is_named_once_and_blocks_no_rerun(first_try: FirstTry) -> None:
    """Rank 1 reads the last shard: it names it, rank 0 leaves without a traceback, and the
    failed run leaves nothing that would refuse the same command once the data is fixed (the
    rerun that `first_try` made trained every epoch)."""
    assert refusal(first_try.failed) == (f"error: {first_try.shard}: corrupt shard (sha256 "
                                         "differs from the manifest)")
    assert not first_try.left_behind
    assert len(Run.load(first_try.run_dir).of("epoch")) == 5


@pytest.mark.multiprocess
def test_resuming_from_a_corrupt_checkpoint_is_one_line(finished_run: Path, prepared: Path,
                                                        tmp_path: Path) -> None:
    checkpoint = tmp_path / "step-60"
    shutil.copytree(finished_run / "checkpoints" / "step-000000060", checkpoint)
    shard = sorted(checkpoint.glob("*.distcp"))[0]
    flip_a_byte(shard)
    done = dsl_dist("train", "--nproc", "2", *train_overrides(prepared, tmp_path / "run"),
                    f"checkpoint.resume={checkpoint}")
    assert refusal(done) == (f"error: {checkpoint}: {shard.name} does not match its checksum "
                             "(corrupt)")
    assert not (tmp_path / "run").exists()


def test_the_learning_curve_has_a_point_per_epoch(finished_run: Path) -> None:
    """The training loss of every epoch: a default run (compose_job([])) trains at least 5."""
    assert compose_job([]).train.epochs >= 5
    epochs, losses = Run.load(finished_run).curve("loss")
    assert epochs == [1, 2, 3, 4, 5] and losses[-1] < losses[0]
    assert Run.load(finished_run).curve("recall@20")[0] == [5]


def test_report_skips_unstarted_runs_and_refuses_an_existing_out(finished_run: Path,
                                                                 tmp_path: Path) -> None:
    husk, out = tmp_path / "husk", tmp_path / "report"
    husk.mkdir()  # what a run that failed before its first step used to leave
    shutil.copy(finished_run / "config.yaml", husk)
    (husk / "metrics.jsonl").write_text("")
    done = dsl_dist("report", finished_run, husk, "--out", out)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"skipping {husk}: it never trained a step"
    assert "husk" not in (out / "index.md").read_text()

    again = dsl_dist("report", finished_run, "--out", out)
    assert refusal(again) == f"error: --out {out} exists; give --overwrite to replace it"
    (out / "stale.png").write_bytes(b"")
    replaced = dsl_dist("report", finished_run, "--out", out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in out.iterdir()) == ["index.md", "learning_curves.png"]


def test_an_export_is_readable_by_all_and_serve_refuses_a_busy_port(finished_run: Path,
                                                                    tmp_path: Path) -> None:
    artifact = tmp_path / "exported"
    done = dsl_dist("export", finished_run, "--out", artifact)
    assert done.returncode == 0, done.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in artifact.iterdir()}
    assert set(modes.values()) == {0o644}, modes  # as the umask 022 gives any file

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        served = dsl_dist("serve", artifact, "--port", port)
    assert refusal(served) == (f"error: cannot listen on 127.0.0.1:{port} (Address already "
                               "in use); choose another --port")
