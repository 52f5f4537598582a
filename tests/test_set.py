"""SET on sharded tables, on real ranks: magnitude drop, a random grow that is a pure function of
(seed, step, position) — the same weights on 1 and 2 ranks on every sharding type — no
gradients recorded, and a run that keeps its budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ranks import run_ranks
from test_dsl import DIM, NUM_ITEMS, NUM_USERS, build, dump_masks, full_masks, train_sparse
from test_training import SHARDING_TYPES


def set_update(sharding_type: str) -> dict:
    """One SET update (with a growth statistic that must not matter), and per shard the
    weights before it, the masks, and each weight's grow score."""
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.sparsity.selection.hashing import uniform_hash
    from dsl_dist.sparsity.unstructured.set import grow_seed

    ctx, _, method = build(sharding_type, method="set")
    initial = dump_masks(method)
    weights = [s.shard.weight.detach().clone() for s in method.shards]
    for s in method.shards:
        s.growth.copy_(uniform_hash(s.positions(), seed=99))
    record = method.update(step=3)
    scores = [uniform_hash(s.positions(), grow_seed(0, 3)) for s in method.shards]
    result = {"initial": initial, "after": dump_masks(method), "record": record.as_dict(),
              "weights": [w.tolist() for w in weights],
              "scores": [x.tolist() for x in scores], "budget": method.budget,
              "zeros": all(bool((s.shard.weight[~s.mask] == 0).all()) for s in method.shards),
              "capturing": [t for t in range(1, 11) if method.before_step(t) is None
                            and method.recorder.capturing]}
    shutdown_distributed()
    return result


def full_values(result: dict, field: str) -> dict[str, torch.Tensor]:
    """Each table's `field` (a value per weight) from the shards of a 1-rank result."""
    values = {t: torch.full((n, DIM), float("nan"))
              for t, n in (("user", NUM_USERS), ("item", NUM_ITEMS))}
    for s, shard_values in zip(result["initial"], result[field]):
        block = torch.tensor(shard_values)
        values[s["table"]][s["row"]:s["row"] + block.shape[0],
                           s["col"]:s["col"] + block.shape[1]] = block
    return values


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_set_grows_the_same_weights_on_one_and_two_ranks(sharding_type: str,
                                                         tmp_path: Path) -> None:
    one = run_ranks(set_update, 1, tmp_path / "one", sharding_type)
    two = run_ranks(set_update, 2, tmp_path / "two", sharding_type)
    for phase in ("initial", "after"):
        single, double = full_masks([one[0][phase]]), full_masks([r[phase] for r in two])
        for table in single:
            assert torch.equal(single[table], double[table]), (phase, table)
    budget = one[0]["budget"]
    for result in one + two:
        assert result["record"]["active"] == budget
        assert result["record"]["dropped"] == result["record"]["grown"] > 0
        assert result["zeros"] and result["capturing"] == []
    before, after = full_masks([one[0]["initial"]]), full_masks([one[0]["after"]])
    weights, scores = full_values(one[0], "weights"), full_values(one[0], "scores")
    # drop by magnitude: the weights that left the mask are among the `dropped` active
    # weights of smallest |w| (the others of those were grown straight back)
    active = torch.cat([weights[t].abs()[before[t] == 1] for t in before]).sort().values
    left = torch.cat([weights[t].abs()[(before[t] == 1) & (after[t] == 0)] for t in before])
    assert len(left) and float(left.max()) <= float(active[one[0]["record"]["dropped"] - 1])
    # grow at random: the grown weights are those of highest hash score among the weights
    # inactive after the drop (the growth statistic plays no part)
    grown = torch.cat([scores[t][(before[t] == 0) & (after[t] == 1)] for t in before])
    passed = torch.cat([scores[t][after[t] == 0] for t in before])
    assert len(grown) and float(grown.min()) >= float(passed.max())
    assert float(grown.min()) < 0.9, "the grow scores are not spread over [0, 1)"


@pytest.mark.multiprocess
def test_set_training_keeps_the_budget(clustered_source: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"data.source={clustered_source}", f"data.path={tmp_path / 'prepared'}",
                 "data.batch_size=32", "model.embedding_dim=16", "train.epochs=3",
                 "model.sharding_type=row_wise", "train.lr=0.1", "train.log_every=0",
                 "sparsity=set", "sparsity.density=0.25", "sparsity.delta_t=2",
                 f"run_dir={run_dir}"]
    results = run_ranks(train_sparse, 2, tmp_path / "out", overrides)
    budget = round(0.25 * (120 + 60) * 16)
    assert all(r["zeros"] for r in results) and results[0]["active"] == budget
    assert results[0]["metrics"] == results[1]["metrics"]
    updates = [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if e["event"] == "update"]
    assert len(updates) >= 5 and len({u["mask_digest"] for u in updates}) == len(updates)
    assert all(u["active"] == budget and u["dropped"] == u["grown"] > 0 for u in updates)
