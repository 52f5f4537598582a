from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ranks.py for spawned workers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


HOME_KEY = pytest.StashKey[tuple[Path, Optional[str]]]()


def pytest_configure(config: pytest.Config) -> None:
    """HOME for the whole run: a temporary directory, so that the tests never write to the
    user's home. Ray's ray.init() leaves ~/.ray/auth_token there, after which every `ray
    start` on the machine turns token authentication on; matplotlib writes its font cache
    there when a test module imports it. Set here, before the modules are collected; the
    subprocesses the tests start inherit it."""
    home = Path(tempfile.mkdtemp(prefix="dsl-dist-tests-home-"))
    config.stash[HOME_KEY] = (home, os.environ.get("HOME"))
    os.environ["HOME"] = str(home)


def pytest_unconfigure(config: pytest.Config) -> None:
    home, users = config.stash[HOME_KEY]
    if users is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = users
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def private_home(pytestconfig: pytest.Config) -> Path:
    """The run's HOME (pytest_configure)."""
    return pytestconfig.stash[HOME_KEY][0]


def write_clustered_dataset(directory: Path, num_users: int = 120, num_items: int = 60,
                            clusters: int = 4, per_user: int = 12, seed: int = 0) -> Path:
    """LightGCN-format train/test files where users prefer the items of their own cluster,
    so that a model can learn something in a few steps."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    train_lines, test_lines = [], []
    for user in range(num_users):
        cluster_items = np.arange(user % clusters, num_items, clusters)
        items = rng.choice(cluster_items, size=min(per_user, len(cluster_items)), replace=False)
        split = len(items) * 3 // 4
        train_lines.append(" ".join(map(str, [user, *items[:split]])))
        test_lines.append(" ".join(map(str, [user, *items[split:]])))
    (directory / "train.txt").write_text("\n".join(train_lines) + "\n")
    (directory / "test.txt").write_text("\n".join(test_lines) + "\n")
    return directory


@pytest.fixture
def clustered_source(tmp_path: Path) -> Path:
    return write_clustered_dataset(tmp_path / "source")


@pytest.fixture
def device() -> torch.device:
    """Where the tests marked `cuda` put their tensors: DSL_TEST_DEVICE (cpu unless set), so
    that the same tests check the CUDA kernels on a GPU machine (benchmarks/gpu_check.py)."""
    chosen = torch.device(os.environ.get("DSL_TEST_DEVICE", "cpu"))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"DSL_TEST_DEVICE={chosen}: torch sees no CUDA device")
    return chosen


EXPORT_STEPS = ["train.max_steps=12", "checkpoint.every=0", "eval.every_epochs=0"]
EXPORT_RUNS = {
    "mf-dense": ["model=mf", "sparsity=dense"],
    "mf-dsl": ["model=mf", "sparsity=dsl", "sparsity.density=0.2", "sparsity.delta_t=4",
               "model.sharding_type=row_wise"],
    "mf-block_dsl": ["model=mf", "sparsity=block_dsl", "sparsity.density=0.25",
                     "sparsity.delta_t=4", "model.sharding_type=row_wise"],
    "lightgcn-dense": ["model=lightgcn", "sparsity=dense", "model.lightgcn.propagation=full"],
    "lightgcn-dsl": ["model=lightgcn", "sparsity=dsl", "sparsity.density=0.2",
                     "sparsity.delta_t=4", "model.sharding_type=column_wise"],
}
"""Short 2-rank lastfm runs that tests/test_export.py and tests/test_serve.py export and serve:
MF and LightGCN (full and bags propagation), dense, weight-level and block-level DSL."""


@pytest.fixture(scope="session")
def lastfm_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The EXPORT_RUNS trained on one prepared lastfm (prepared by the first run, then the
    others three at a time), by name: their run directories."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from test_launchers import environment

    if not (SHARED_DATA / "lastfm").is_dir():
        pytest.skip("shared data not present")
    root = tmp_path_factory.mktemp("export-runs")
    prepared = root / "lastfm"

    def train(name: str) -> Path:
        run_dir = root / name
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "-m", "dsl_dist.train", f"data.source={SHARED_DATA / 'lastfm'}",
             f"data.path={prepared}", *EXPORT_STEPS, *EXPORT_RUNS[name], f"run_dir={run_dir}"],
            cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
        return run_dir

    names = list(EXPORT_RUNS)
    runs = {names[0]: train(names[0])}
    with ThreadPoolExecutor(3) as pool:
        runs.update(zip(names[1:], pool.map(train, names[1:])))
    return runs


@pytest.fixture(scope="session")
def lastfm_artifacts(lastfm_runs: dict[str, Path],
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every run of `lastfm_runs` exported (in this process), by name."""
    from dsl_dist.serving.export import export

    root = tmp_path_factory.mktemp("artifacts")
    for name, run_dir in lastfm_runs.items():
        export(run_dir, root / name)
    return {name: root / name for name in lastfm_runs}
