from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ranks.py for spawned workers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
