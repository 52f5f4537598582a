"""Evaluation in bounded memory gives the metrics of scoring every user against every item at
once, on the shared data sets; a sample of users is the users it says it scored."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from ranks import run_ranks
from test_config import load


def blocked_and_whole(overrides: list[str], max_users: int | None) -> dict:
    """Metrics of `evaluate` with tiny blocks of users and items, and of the whole score
    matrix of the same users (the evaluation before it was blocked)."""
    from dsl_dist import evaluation
    from dsl_dist.data.stream import history_batch, read_user_items
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.train import build_trainer

    trainer = build_trainer(load(*overrides))
    trainer.fit()
    ctx, num_items, path = trainer.ctx, trainer.manifest.num_items, trainer.dataset_dir
    evaluation.ITEM_BLOCK = 997  # several blocks, the last one short
    blocked = evaluation.evaluate(trainer.model, path, "test", num_items, [20, 50], ctx,
                                  memory_mb=1, max_users=max_users, seed=3)
    model = trainer.model.module
    targets = read_user_items(path, "test", rank=ctx.rank, world_size=ctx.world_size)
    seen = read_user_items(path, "train", rank=ctx.rank, world_size=ctx.world_size)
    users = evaluation.sampled_users(targets.users, max_users, 3, ctx)
    with torch.no_grad():
        items = model.item_side(ctx.device, 4096)
        side = model.user_side(items, torch.from_numpy(users), history_batch(seen, users))
        scores = model.score(items, side, 0, num_items)
    scores[evaluation.items_matrix(users, seen, num_items)] = -torch.inf
    sums = evaluation.ranking_metrics(scores, evaluation.items_matrix(users, targets, num_items),
                                      [20, 50])
    whole = {name: float(value) / len(users) for name, value in sums.items()}
    shutdown_distributed()
    return {"blocked": blocked, "whole": whole, "users": len(users)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("data", ["lastfm", "gowalla"])
def test_blocked_evaluation_equals_the_whole_score_matrix(data: str, tmp_path: Path) -> None:
    if not (SHARED_DATA / data).is_dir():
        pytest.skip("shared data not present")
    overrides = [f"data={data}", f"data.source={SHARED_DATA / data}",
                 f"data.path={tmp_path / data}", "train.max_steps=40", "train.log_every=0",
                 f"run_dir={tmp_path / 'run'}"]
    # gowalla's whole score matrix would take 5 GB: a sample of its users
    sample = 3000 if data == "gowalla" else None
    result, = run_ranks(blocked_and_whole, 1, tmp_path / "out",
                        overrides + [f"eval.max_users={sample or 'null'}"], sample)
    for name, value in result["whole"].items():
        assert math.isclose(result["blocked"][name], value, rel_tol=1e-6, abs_tol=1e-9), name
    assert result["blocked"]["users"] == result["users"] > 1000
    assert result["whole"]["recall@20"] > 0  # a ranking that finds something


@pytest.mark.multiprocess
@pytest.mark.skipif(not (SHARED_DATA / "lastfm").is_dir(), reason="shared data not present")
def test_a_sample_of_users_is_scored_alike_on_every_rank(tmp_path: Path) -> None:
    overrides = [f"data.source={SHARED_DATA / 'lastfm'}", f"data.path={tmp_path / 'lastfm'}",
                 "train.max_steps=20", "train.log_every=0", f"run_dir={tmp_path / 'run'}"]
    results = run_ranks(blocked_and_whole, 2, tmp_path / "out", overrides, 300)
    scored = results[0]["blocked"]["users"]
    assert results[0]["blocked"] == results[1]["blocked"]
    assert scored == sum(r["users"] for r in results)
    assert 200 < scored < 400  # about the sample asked for, of 1,800 users with test items
    whole = {name: np.average([r["whole"][name] for r in results],
                              weights=[r["users"] for r in results])
             for name in results[0]["whole"]}
    for name, value in whole.items():
        assert math.isclose(results[0]["blocked"][name], value, rel_tol=1e-6), name
