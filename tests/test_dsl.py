"""Dynamic Sparse Learning on sharded tables, on real ranks: exact budget, pruned weights at
zero, world-size-independent masks, optimizer-state reset, and a run that learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from ranks import run_ranks
from test_config import load
from test_training import SHARDING_TYPES, run_cli

NUM_USERS, NUM_ITEMS, DIM = 30, 50, 8


def build(sharding_type: str, optimizer: str = "rowwise_adagrad", scope: str = "global",
          method: str = "dsl", **sparsity: object):
    """A weight-level `method` (dsl, set) over MF's tables."""
    from dsl_dist.config import ModelConfig, TrainConfig, sparsity_config
    from dsl_dist.config.registry import SPARSITY_METHODS, load
    from dsl_dist.control.controller import SparsityController
    from dsl_dist.distributed import init_distributed
    from dsl_dist.model.mf import MatrixFactorization
    from dsl_dist.model.sharding import embedding_tables, shard_model
    from dsl_dist.model.shards import init_normal_, local_table_shards
    from dsl_dist.sparsity.base import SparsitySetup
    from dsl_dist.sparsity.schedule import UpdateSchedule

    ctx = init_distributed("gloo")
    module = MatrixFactorization(NUM_USERS, NUM_ITEMS, DIM, 1, l2_reg=0.0)
    tables = embedding_tables(module)
    model = shard_model(module, ModelConfig(sharding_type=sharding_type, embedding_dim=DIM),
                        TrainConfig(optimizer=optimizer, lr=0.1), ctx)
    init_normal_(local_table_shards(model), 0.1, 0)
    cfg = sparsity_config(method, **{"density": 0.3, "delta_t": 1, "scope": scope, **sparsity})
    schedule = UpdateSchedule.of(cfg, total_steps=10)
    dsl = load(SPARSITY_METHODS, method).build(SparsitySetup(
        cfg, 0, 0.1, model, tables, ctx, 10, None,
        connect=lambda budgets, unit: SparsityController(schedule, budgets)))
    return ctx, model, dsl


def dump_masks(dsl) -> list[dict]:
    return [{"table": s.table, "row": s.shard.row_offset, "col": s.shard.col_offset,
             "mask": s.mask.int().tolist()} for s in dsl.shards]


def full_masks(per_rank: list[list[dict]]) -> dict[str, torch.Tensor]:
    """Assembles each table's mask from the shards of all ranks by their global offsets."""
    sizes = {"user": NUM_USERS, "item": NUM_ITEMS}
    masks = {t: torch.full((n, DIM), -1) for t, n in sizes.items()}
    for shards in per_rank:
        for s in shards:
            block = torch.tensor(s["mask"])
            target = masks[s["table"]][s["row"]:s["row"] + block.shape[0],
                                       s["col"]:s["col"] + block.shape[1]]
            assert torch.all((target == -1) | (target == block)), "replicas disagree"
            target.copy_(block)
    assert all(bool((m >= 0).all()) for m in masks.values()), "a weight has no mask bit"
    return masks


def update_with_fixed_statistics(sharding_type: str, scope: str) -> dict:
    """Identical weights (world-independent init) and growth statistics on any world size."""
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.sparsity.selection.hashing import uniform_hash

    ctx, model, dsl = build(sharding_type, scope=scope)
    initial = dump_masks(dsl)
    for s in dsl.shards:
        s.growth.copy_(uniform_hash(s.positions(), seed=99))
    record = dsl.update(step=1)
    zeros = all(bool((s.shard.weight[~s.mask] == 0).all()) for s in dsl.shards)
    result = {"initial": initial, "after": dump_masks(dsl), "record": record.as_dict(),
              "zeros": zeros,
              "budget": dsl.budget}
    shutdown_distributed()
    return result


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding_type, scope", [(t, "global") for t in SHARDING_TYPES] +
                         [("row_wise", "per_table")])
def test_two_ranks_choose_the_masks_one_rank_chooses(sharding_type: str, scope: str,
                                                     tmp_path: Path) -> None:
    one = run_ranks(update_with_fixed_statistics, 1, tmp_path / "one", sharding_type, scope)
    two = run_ranks(update_with_fixed_statistics, 2, tmp_path / "two", sharding_type, scope)
    budget = one[0]["budget"]
    expected_budget = round(0.3 * (NUM_USERS + NUM_ITEMS) * DIM) if scope == "global" else \
        round(0.3 * NUM_USERS * DIM) + round(0.3 * NUM_ITEMS * DIM)
    assert budget == expected_budget
    for phase in ("initial", "after"):
        single, double = full_masks([one[0][phase]]), full_masks([r[phase] for r in two])
        for table in single:
            assert torch.equal(single[table], double[table]), (phase, table)
        assert sum(int(m.sum()) for m in double.values()) == budget
    assert not torch.equal(full_masks([one[0]["initial"]])["item"],
                           full_masks([one[0]["after"]])["item"]), "the update moved nothing"
    for result in one + two:
        record = result["record"]
        assert record["active"] == budget and record["dropped"] == record["grown"] > 0
        assert result["zeros"]
    assert one[0]["record"]["density"] == two[0]["record"]["density"] == two[1]["record"]["density"]


def reset_after_training(optimizer: str) -> dict:
    from torchrec import KeyedJaggedTensor

    from dsl_dist.distributed import shutdown_distributed

    ctx, model, dsl = build("row_wise", optimizer=optimizer)
    ids = torch.tensor([0, 7, 21, 29, 3, 14, 40, 49]) + ctx.rank
    batch = KeyedJaggedTensor.from_lengths_sync(keys=["user", "item", "neg_0"],
                                                values=torch.cat([ids[:2] % NUM_USERS, ids[2:4],
                                                                  ids[4:6]]),
                                                lengths=torch.ones(6, dtype=torch.int32))
    for step in range(1, 4):
        dsl.before_step(step)
        model(batch).backward()
        dsl.after_backward()
        dsl.after_optimizer_step(step)
    checks = []
    for s in dsl.shards:
        before = [state.clone() for state in s.shard.optimizer_states()]
        old_mask = s.mask.clone()
        checks.append((s, before, old_mask))
    for s in dsl.shards:
        s.growth.copy_(torch.rand(s.growth.shape, generator=torch.Generator().manual_seed(1)))
    dsl.update(step=4)
    report = {"elementwise_changed_zero": True, "unchanged_kept": True, "nonzero_before": False,
              "revived_rows_zero": True}
    for s, before, old_mask in checks:
        changed = old_mask ^ s.mask
        revived = ~old_mask.any(1) & s.mask.any(1)
        for old, new in zip(before, s.shard.optimizer_states()):
            report["nonzero_before"] |= bool((old != 0).any())
            if new.numel() == changed.numel():
                new, old = new.view_as(changed), old.view_as(changed)
                report["elementwise_changed_zero"] &= bool((new[changed] == 0).all())
                report["unchanged_kept"] &= bool(torch.equal(new[~changed], old[~changed]))
            else:
                report["revived_rows_zero"] &= bool((new.view(-1)[revived] == 0).all())
                report["unchanged_kept"] &= bool(torch.equal(new.view(-1)[~revived],
                                                             old.view(-1)[~revived]))
        assert bool((s.shard.weight[~s.mask] == 0).all())
    shutdown_distributed()
    return report


@pytest.mark.multiprocess
@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise_adagrad"])
def test_optimizer_state_is_reset_where_the_mask_changes(optimizer: str, tmp_path: Path) -> None:
    for report in run_ranks(reset_after_training, 2, tmp_path, optimizer):
        assert report == {"elementwise_changed_zero": True, "unchanged_kept": True,
                          "nonzero_before": True, "revived_rows_zero": True}


def train_sparse(overrides: list[str]) -> dict:
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.train import build_trainer

    trainer = build_trainer(load(*overrides))
    metrics = trainer.fit()
    for step, batch in enumerate(trainer.stream):  # steps after the last update, checked one by one
        trainer.train_step(batch)
        zeros = all(bool((s.shard.weight[~s.mask] == 0).all()) for s in trainer.sparsity.shards)
        if not zeros or step == 3:
            break
    active = sum(trainer.sparsity.active_per_table()[0].values())
    shutdown_distributed()
    return {"metrics": metrics, "zeros": zeros, "active": active}


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding_type, tables, extra", [(t, [], []) for t in SHARDING_TYPES] +
                         [("table_wise", ["item"], []),
                          # masking single-id lookups' gradients instead of re-masking rows
                          ("table_wise", [], ["sparsity.mask_gradients=true"]),
                          ("column_wise", [], ["sparsity.mask_gradients=true"])])
def test_sparse_training_keeps_the_budget(sharding_type: str, tables: list[str], extra: list[str],
                                          clustered_source: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [f"data.source={clustered_source}", f"data.path={tmp_path / 'prepared'}",
                 "data.batch_size=32", "model.embedding_dim=16", "train.epochs=4",
                 f"model.sharding_type={sharding_type}", "train.lr=0.1", "train.log_every=0",
                 "sparsity=dsl", "sparsity.density=0.25", "sparsity.delta_t=2",
                 "sparsity.growth=accumulated", f"sparsity.tables=[{','.join(tables)}]",
                 f"run_dir={run_dir}", *extra]
    results = run_ranks(train_sparse, 2, tmp_path / "out", overrides)
    budget = round(0.25 * (60 if tables else 120 + 60) * 16)
    assert all(r["zeros"] for r in results), "a pruned weight is not zero after training"
    assert results[0]["active"] == results[1]["active"] == budget
    assert results[0]["metrics"] == results[1]["metrics"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [e for e in events if e["event"] == "update"]
    assert len(updates) >= 5
    for update in updates:
        assert update["active"] == update["budget"] == budget
        assert update["dropped"] == update["grown"]


@pytest.mark.multiprocess
@pytest.mark.skipif(not (SHARED_DATA / "lastfm").is_dir(), reason="shared data not present")
def test_dsl_on_lastfm_learns_and_moves_table_densities(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli(f"data.source={SHARED_DATA / 'lastfm'}", f"data.path={tmp_path / 'lastfm'}",
                   "sparsity=dsl", "sparsity.density=0.2", "sparsity.delta_t=20",
                   "train.epochs=4", "model.sharding_type=row_wise", f"run_dir={run_dir}",
                   cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "epoch"]
    updates = [e for e in events if e["event"] == "update"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert updates and all(u["active"] == u["budget"] for u in updates)
    first, last = updates[0]["density"], updates[-1]["density"]
    assert abs(last["user"] - 0.2) > 0.05 and abs(last["item"] - 0.2) > 0.01, (first, last)
    assert events[-1]["event"] == "eval" and events[-1]["recall@20"] > 0.05


def train_metrics(overrides: list[str]) -> dict:
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.train import build_trainer

    metrics = build_trainer(load(*overrides)).fit()
    shutdown_distributed()
    return metrics


@pytest.mark.multiprocess
def test_full_density_trains_exactly_like_dense(clustered_source: Path, tmp_path: Path) -> None:
    """At density 1 every dropped weight is grown straight back with its value, so DSL must
    leave training untouched: a check that masking and updates add nothing of their own."""
    common = [f"data.source={clustered_source}", f"data.path={tmp_path / 'prepared'}",
              "data.batch_size=32", "model.embedding_dim=16", "train.epochs=3",
              "model.sharding_type=row_wise", "train.log_every=0"]
    dense = run_ranks(train_metrics, 2, tmp_path / "dense", common + [f"run_dir={tmp_path / 'd'}"])
    full = run_ranks(train_metrics, 2, tmp_path / "full",
                     common + ["sparsity=dsl", "sparsity.density=1.0", "sparsity.delta_t=3",
                               "sparsity.growth=accumulated", f"run_dir={tmp_path / 's'}"])
    assert dense[0] == full[0] == full[1]
    updates = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text()
               .splitlines() if '"update"' in line]
    assert updates and all(u["dropped"] == u["grown"] == u["regrown"] > 0 for u in updates)


def capturing_steps() -> dict:
    from dsl_dist.distributed import shutdown_distributed

    steps = {}
    for growth, every in (("accumulated", 1), ("accumulated", 3), ("last_batch", 3)):
        _, _, dsl = build("table_wise", growth=growth, growth_every=every, delta_t=5)
        steps[f"{growth}/{every}"] = [t for t in range(1, 11) if dsl.before_step(t) is None
                                      and dsl.recorder.capturing]
        shutdown_distributed()
    return steps


@pytest.mark.multiprocess
def test_growth_is_recorded_on_the_steps_it_needs(tmp_path: Path) -> None:
    steps = run_ranks(capturing_steps, 1, tmp_path)[0]
    assert steps["accumulated/1"] == list(range(1, 11))
    # every 3rd step, and the update step (5; none at the run's last step, 10)
    assert steps["accumulated/3"] == [3, 5, 6, 9]
    assert steps["last_batch/3"] == [5]


def initial_prefix_masks(sharding_type: str) -> dict:
    from dsl_dist.distributed import shutdown_distributed

    _, _, dsl = build(sharding_type, init_mask="prefix")
    result = {"masks": dump_masks(dsl), "budget": dsl.budget}
    shutdown_distributed()
    return result


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding_type", ["row_wise", "column_wise"])
def test_prefix_initial_masks_fill_the_first_columns_on_any_world_size(
        sharding_type: str, tmp_path: Path) -> None:
    one = run_ranks(initial_prefix_masks, 1, tmp_path / "one", sharding_type)
    two = run_ranks(initial_prefix_masks, 2, tmp_path / "two", sharding_type)
    single, double = full_masks([one[0]["masks"]]), full_masks([r["masks"] for r in two])
    budget = one[0]["budget"]
    rows = NUM_USERS + NUM_ITEMS
    full, extra = divmod(budget, rows)  # 0.3 × 8 columns: 2 for every row, a third for some
    assert full == 2 and extra > 0
    for table, mask in single.items():
        assert torch.equal(mask, double[table]), table
        assert bool(mask[:, :full].all()) and not bool(mask[:, full + 1:].any()), table
    assert sum(int(m[:, full].sum()) for m in single.values()) == extra


def grown_weights(sharding_type: str) -> list:
    """(table, row, col, value) of every weight one update grows, with grow_init_std."""
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.sparsity.selection.hashing import uniform_hash

    _, _, dsl = build(sharding_type, grow_init_std=0.05)
    before = [s.mask.clone() for s in dsl.shards]
    for s in dsl.shards:
        s.growth.copy_(uniform_hash(s.positions(), seed=99))
    dsl.update(step=1)
    grown = []
    for s, old in zip(dsl.shards, before):
        for row, col in torch.nonzero(s.mask & ~old).tolist():
            grown.append([s.table, s.shard.row_offset + row, s.shard.col_offset + col,
                          float(s.shard.weight[row, col])])
    shutdown_distributed()
    return grown


@pytest.mark.multiprocess
def test_grown_weights_start_at_the_same_random_values_on_any_world_size(tmp_path: Path) -> None:
    one = run_ranks(grown_weights, 1, tmp_path / "one", "row_wise")[0]
    two = [w for rank in run_ranks(grown_weights, 2, tmp_path / "two", "row_wise") for w in rank]
    assert len(one) > 20 and sorted(one) == sorted(two)
    values = torch.tensor([w[3] for w in one])
    assert bool((values != 0).all()) and bool((values.abs() <= 0.05 * 3 ** 0.5).all())
    assert 0.03 < float(values.std()) < 0.07
