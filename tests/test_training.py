"""End-to-end training on real ranks: every sharding type learns, and the distributed
full-ranking metrics equal a single-process brute-force computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO
from ranks import run_ranks
from test_config import load

SHARDING_TYPES = ["table_wise", "row_wise", "column_wise", "data_parallel"]


def read_lightgcn(path: Path) -> dict[int, set[int]]:
    rows = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {int(r[0]): {int(i) for i in r[1:]} for r in rows}


def brute_force_metrics(users: np.ndarray, items: np.ndarray, source: Path, dataset: Path,
                        k: int) -> dict[str, float]:
    """Recall@k / NDCG@k from full embedding matrices and the raw text files, one user at a
    time, with none of the project's data readers."""
    def mapping(name: str) -> dict[int, int]:
        table = pq.read_table(dataset / f"{name}_map.parquet")
        return dict(zip(table["raw"].to_pylist(), table["index"].to_pylist()))
    user_map, item_map = mapping("user"), mapping("item")
    train, test = read_lightgcn(source / "train.txt"), read_lightgcn(source / "test.txt")
    recall = ndcg = 0.0
    counted = 0
    for raw_user, raw_items in test.items():
        if not raw_items:
            continue
        u = user_map[raw_user]
        scores = items @ users[u]
        for raw_item in train.get(raw_user, ()):
            scores[item_map[raw_item]] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        truth = {item_map[i] for i in raw_items}
        hits = [1.0 if i in truth else 0.0 for i in top]
        recall += sum(hits) / len(truth)
        ndcg += (sum(h / math.log2(p + 2) for p, h in enumerate(hits)) /
                 sum(1 / math.log2(p + 2) for p in range(min(k, len(truth)))))
        counted += 1
    return {f"recall@{k}": recall / counted, f"ndcg@{k}": ndcg / counted}


def train_and_check(overrides: list[str], source: str) -> dict:
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.model.base import lookup
    from dsl_dist.train import build_trainer

    cfg = load(*overrides)
    trainer = build_trainer(cfg)
    ctx = trainer.ctx
    metrics = trainer.fit()
    with torch.no_grad():
        model = trainer.model.module
        items = model.item_side(ctx.device, 64)
        users = lookup(model.embeddings, model.keys, "user", torch.arange(trainer.manifest.num_users))
    reference = brute_force_metrics(users.numpy().astype(np.float64),
                                    items.numpy().astype(np.float64), Path(source),
                                    Path(cfg.data.path), 20)
    shutdown_distributed()
    return {"metrics": metrics, "reference": reference}


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_two_ranks_learn_and_agree(sharding_type: str, clustered_source: Path,
                                   tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"data.source={clustered_source}", f"data.path={tmp_path / 'prepared'}",
                 "data.batch_size=32", "data.num_negatives=2", "model.embedding_dim=16",
                 f"model.sharding_type={sharding_type}", "train.epochs=6", "train.lr=0.1",
                 "train.log_every=0", f"run_dir={run_dir}"]
    results = run_ranks(train_and_check, 2, tmp_path / "out", overrides, str(clustered_source))

    assert results[0]["metrics"] == results[1]["metrics"], "ranks disagree on the metrics"
    for name, value in results[0]["reference"].items():
        assert math.isclose(results[0]["metrics"][name], value, rel_tol=1e-6, abs_tol=1e-9), name
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "epoch"]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    # Users prefer their own cluster of items: a learned model beats random ranking by far
    # (random Recall@20 is about 20/60 of the remaining items).
    assert results[0]["metrics"]["recall@20"] > 0.6


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "dsl_dist.train", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.multiprocess
def test_torchrun_cli_with_hydra_overrides(clustered_source: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli(f"data.source={clustered_source}", f"data.path={tmp_path / 'prepared'}",
                   "data.batch_size=32", "train.epochs=2", "eval.ks=[5,20]",
                   f"run_dir={run_dir}", cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recall@20" in done.stdout and "ndcg@5" in done.stdout
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["memory", "epoch", "epoch", "eval"]
    assert (tmp_path / "prepared" / "manifest.json").exists()

    again = run_cli(f"data.source={clustered_source}", f"data.path={tmp_path / 'prepared'}",
                    f"run_dir={run_dir}", cwd=REPO)
    assert again.returncode != 0 and "already holds a run" in again.stderr
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4, "earlier run lost"


@pytest.mark.multiprocess
def test_cli_refuses_bad_config_by_key(tmp_path: Path) -> None:
    done = run_cli("model.sharding_type=diagonal", f"run_dir={tmp_path / 'run'}", cwd=REPO)
    assert done.returncode != 0
    assert "model.sharding_type='diagonal'" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_the_best_epoch_is_chosen_on_validation_and_its_checkpoint_kept(
        clustered_source: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli(f"data.source={clustered_source}", f"data.path={tmp_path / 'prepared'}",
                   "data.valid_fraction=0.2", "data.batch_size=32", "train.epochs=4",
                   "train.lr=0.5", "eval.every_epochs=1", "eval.select_split=valid",
                   f"run_dir={run_dir}", cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {(e["epoch"], e["split"]): e for e in events if e["event"] == "eval"}
    assert {split for _, split in evals} == {"valid", "test"} and len(evals) == 8
    [best] = [e for e in events if e["event"] == "best"]
    valid = {epoch: e["recall@20"] for (epoch, split), e in evals.items() if split == "valid"}
    chosen = min(epoch for epoch, v in valid.items() if v == max(valid.values()))
    assert best["epoch"] == chosen and best["metric"] == "recall@20"
    assert best["valid_recall@20"] == valid[chosen]
    assert best["recall@20"] == evals[(chosen, "test")]["recall@20"]
    assert best["ndcg@20"] == evals[(chosen, "test")]["ndcg@20"]
    [kept] = (run_dir / "checkpoints" / "best").iterdir()
    meta = json.loads((kept / "trainer.json").read_text())
    assert meta["step"] == best["step"] and meta["best"]["best"]["epoch"] == chosen


@pytest.mark.multiprocess
def test_selection_needs_a_validation_split(clustered_source: Path, tmp_path: Path) -> None:
    done = run_cli(f"data.source={clustered_source}", f"data.path={tmp_path / 'prepared'}",
                   "train.epochs=1", "eval.select_split=valid", f"run_dir={tmp_path / 'run'}",
                   cwd=REPO)
    assert done.returncode != 0
    assert "no ['valid'] split to evaluate on" in done.stderr
    assert "data.valid_fraction" in done.stderr
