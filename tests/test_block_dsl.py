"""Structured DSL (block_dsl) on real ranks: pools sized to the budget, an exact budget, zeros
where blocks are inactive, the same choice on 1 and 2 ranks, exact resume and resharding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from ranks import run_ranks
from test_checkpoint import assert_same_tensors, final_checkpoint, single_process, tensors
from test_config import load
from test_launchers import environment, record, torchrun

BLOCK = ["sparsity=block_dsl", "sparsity.density=0.25", "sparsity.delta_t=4",
         "sparsity.growth=accumulated"]


def common(source: Path, tmp_path: Path) -> list[str]:
    return [f"data.source={source}", f"data.path={tmp_path / 'prepared'}", "data.batch_size=32",
            "model.embedding_dim=16", "train.lr=0.1", "train.log_every=0", "sparsity.block.size=4"]


def train_and_look_up(overrides: list[str]) -> dict:
    """Trains; returns the metrics, each pool's slots against the budget, and whether the
    embeddings the model looks up are the pools' blocks with zeros beyond every row's width."""
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.model.base import lookup
    from dsl_dist.model.mf import bpr_loss
    from dsl_dist.train import build_trainer

    trainer = build_trainer(load(*overrides))
    metrics = trainer.fit()
    model = trainer.model.module
    looked_up = {"user": lookup(model.embeddings, model.keys, "user",
                                torch.arange(trainer.manifest.num_users)),
                 "item": model.item_side(trainer.ctx.device, 64)}
    exact, zeros_beyond = True, True
    for s in trainer.sparsity.shards:
        rows = s.virtual_rows()
        exact &= torch.equal(looked_up[s.table][s.first_row:s.end_row], rows)
        columns = torch.arange(s.geometry.dim)[None, :]
        beyond = columns >= s.widths[:, None].long() * s.geometry.block
        zeros_beyond &= bool((rows[beyond] == 0).all()) and bool((rows[~beyond] != 0).any())
    slots = sum(s.capacity for s in trainer.sparsity.shards)
    # a training batch's loss from the whole tables as the pools hold them, rebuilt here
    tables = {"user": torch.zeros(trainer.manifest.num_users, 16),
              "item": torch.zeros(trainer.manifest.num_items, 16)}
    for shards in trainer.ctx.all_gather_object([(s.table, s.first_row, s.virtual_rows())
                                                 for s in trainer.sparsity.shards]):
        for table, first, rows in shards:
            tables[table][first:first + len(rows)] = rows
    batch = next(iter(trainer.stream))
    with torch.no_grad():
        loss = float(trainer.model(batch))
    ids = {key: batch[key].values() for key in batch.keys()}
    expected = float(bpr_loss(tables["user"][ids["user"]], tables["item"][ids["item"]],
                              tables["item"][ids["neg_0"]][:, None], trainer.cfg.train.l2_reg))
    shutdown_distributed()
    return {"metrics": metrics, "exact": exact, "zeros_beyond": zeros_beyond, "slots": slots,
            "loss": loss, "expected_loss": expected}


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_block_dsl_learns_within_a_pool_of_its_budget(sharding_type: str, clustered_source: Path,
                                                       tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = run_ranks(train_and_look_up, 2, tmp_path / "out",
                        [*common(clustered_source, tmp_path), *BLOCK, "train.epochs=6",
                         f"model.sharding_type={sharding_type}", f"run_dir={run_dir}"])
    events = record(run_dir)
    budget = round(0.25 * (120 + 60) * 4) * 4  # blocks of 4 of the 16 dimensions, in weights
    assert len(events["update"]) > 5
    for update in events["update"]:
        assert update["active"] == update["budget"] == budget
        assert update["dropped"] == update["grown"] and update["dropped"] % 4 == 0
    assert any(u["grown"] > u["regrown"] for u in events["update"]), "nothing new ever grew"
    assert all(r["exact"] and r["zeros_beyond"] for r in results)
    for result in results:  # training sees each feature's own blocks, whatever the sharding
        assert result["loss"] == pytest.approx(result["expected_loss"], rel=1e-5)
    # the pools hold the budget and their headroom (10%), not the dense tables' 180 rows x 16
    slots = sum(r["slots"] for r in results)
    assert budget / 4 <= slots <= 1.1 * budget / 4 + 2
    assert results[0]["metrics"] == results[1]["metrics"]
    losses = [e["loss"] for e in events["epoch"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert results[0]["metrics"]["recall@20"] > 0.6, results[0]["metrics"]


def statistics_after_steps(overrides: list[str]) -> dict:
    """The growth statistics' nonzero rows after 3 training steps that capture, then after an
    evaluation (which must add nothing)."""
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.train import build_trainer

    trainer = build_trainer(load(*overrides))
    batches = trainer.batches()
    for _ in range(3):
        trainer.train_step(next(batches))

    def statistics() -> list[torch.Tensor]:
        return [t.clone() for s in trainer.sparsity.shards for t in (s.grow_next, s.grow_last)]

    trained = statistics()
    trainer.sparsity.before_step(trainer.step + 1)  # capturing, as before the next step
    trainer.evaluate(epoch=0)
    result = {"nonzero": [int(t.ne(0).sum()) for t in trained],
              "evaluation_added": any(not torch.equal(a, b)
                                      for a, b in zip(trained, statistics()))}
    shutdown_distributed()
    return result


@pytest.mark.multiprocess
def test_training_steps_record_growth_and_evaluation_does_not(clustered_source: Path,
                                                              tmp_path: Path) -> None:
    """Growth statistics come from the steps' gradients (the lookups' hooks capture them in
    training, never in an evaluation's lookups)."""
    result = run_ranks(statistics_after_steps, 1, tmp_path / "out",
                       [*common(clustered_source, tmp_path), *BLOCK, "sparsity.growth_every=1",
                        # 1.6 blocks a row: a row's next block is active in some items (MF's
                        # gradient of a block is zero where every item lacks it)
                        "sparsity.density=0.4", f"run_dir={tmp_path / 'run'}"])[0]
    assert all(n > 0 for n in result["nonzero"]), result
    assert not result["evaluation_added"]


def update_with_fixed_statistics(overrides: list[str]) -> dict:
    """The initial layout and one update from world-independent weights and statistics."""
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.sparsity.selection.hashing import uniform_hash
    from dsl_dist.train import build_trainer

    method = build_trainer(load(*overrides)).sparsity

    def widths() -> dict[str, dict[int, int]]:
        return {s.table: dict(zip(range(s.first_row, s.end_row), s.widths.tolist()))
                for s in method.shards}

    initial = widths()
    for s in method.shards:
        rows = torch.arange(s.num_rows)
        s.grow_next.copy_(uniform_hash(s.block_positions(rows, 0), 5))
        s.grow_last.copy_(uniform_hash(s.block_positions(rows, 1), 6))
    update = method.update(4)
    result = {"initial": initial, "after": widths(), "digest": update.mask_digest,
              "active": update.active, "moved": update.grown}
    shutdown_distributed()
    return result


def merged(results: list[dict], phase: str) -> dict[str, dict[str, int]]:
    tables: dict[str, dict[str, int]] = {}
    for result in results:
        for table, rows in result[phase].items():
            tables.setdefault(table, {}).update(rows)
    return tables


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_two_ranks_choose_the_blocks_one_rank_chooses(sharding_type: str,
                                                      clustered_source: Path,
                                                      tmp_path: Path) -> None:
    overrides = [*common(clustered_source, tmp_path), *BLOCK, "train.max_steps=10",  # same ζ(t)
                 "sparsity.zeta_0=0.9", "sparsity.block.headroom=0.5",
                 f"model.sharding_type={sharding_type}"]
    one = run_ranks(update_with_fixed_statistics, 1, tmp_path / "one",
                    [*overrides, f"run_dir={tmp_path / 'r1'}"])
    two = run_ranks(update_with_fixed_statistics, 2, tmp_path / "two",
                    [*overrides, f"run_dir={tmp_path / 'r2'}"])
    for phase in ("initial", "after"):
        assert merged(one, phase) == merged(two, phase), phase
        assert sum(w for rows in merged(two, phase).values() for w in rows.values()) * 4 == \
            one[0]["active"]
    assert merged(one, "initial") != merged(one, "after") and one[0]["moved"] > 0
    assert one[0]["digest"] == two[0]["digest"] == two[1]["digest"]


LASTFM = ["sparsity=block_dsl", "sparsity.density=0.2", "sparsity.delta_t=5",
          "sparsity.growth=accumulated", "train.max_steps=30", "checkpoint.every=10",
          "checkpoint.keep=3", "model.sharding_type=row_wise"]


def lastfm(prepared: Path) -> list[str]:
    return [f"data.source={SHARED_DATA / 'lastfm'}", f"data.path={prepared}"]


@pytest.mark.multiprocess
@pytest.mark.skipif(not (SHARED_DATA / "lastfm").is_dir(), reason="shared data not present")
def test_block_checkpoints_resume_exactly_and_reshard(tmp_path: Path) -> None:
    prepared = tmp_path / "lastfm"
    base = tmp_path / "base"
    torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train", *lastfm(prepared),
             *LASTFM, f"run_dir={base}", env=environment())
    # a run that stopped after its step-20 checkpoint goes on to the same end
    restarted = tmp_path / "restarted"
    shutil.copytree(base, restarted)
    shutil.rmtree(restarted / "checkpoints" / "step-000000030")
    done = torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train",
                    *lastfm(prepared), *LASTFM, f"run_dir={restarted}", env=environment())
    assert "resumed from" in done.stdout
    assert record(restarted) == record(base)
    saved = tensors(final_checkpoint(base), tmp_path)
    assert_same_tensors(saved, tensors(final_checkpoint(restarted), tmp_path))
    # 2 ranks -> 1 rank: the same layout, blocks and optimizer state
    one = tmp_path / "one"
    done = single_process(*lastfm(prepared), *LASTFM, f"run_dir={one}",
                          f"checkpoint.resume={final_checkpoint(base)}")
    assert done.returncode == 0, done.stderr[-3000:]
    resharded = tensors(final_checkpoint(one), tmp_path)
    canonical = [k for k in saved if k.startswith("sparsity")]
    assert any(k.startswith("sparsity_blocks.") for k in canonical)
    assert_same_tensors({k: saved[k] for k in canonical}, {k: resharded[k] for k in canonical})
    widths = sum(int(saved[k].sum()) for k in canonical if k.endswith(".widths"))
    budget = record(base)["update"][-1]["budget"]
    assert widths * 8 == budget
    assert all(u["active"] == budget for u in record(base)["update"])
    histories = [json.loads((final_checkpoint(r) / "trainer.json").read_text())["controller"]
                 for r in (base, one)]
    assert histories[0]["history"] == histories[1]["history"] and histories[0]["unit"] == 8


def test_the_embeddings_follow_the_order_the_pool_outputs() -> None:
    """A sharded pool returns its features in the order of its shards, not of its tables:
    the collection must label the columns it hands the model by that order."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from dsl_dist.sparsity.block.pool import BlockEmbeddingBagCollection, PoolGeometry

    plain = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=10,
                           feature_names=["user"]),
        EmbeddingBagConfig(name="item", embedding_dim=8, num_embeddings=10,
                           feature_names=["item", "neg_0"])], device=torch.device("meta"))
    pooled = BlockEmbeddingBagCollection(plain, {"item": PoolGeometry.of(10, 8, 4, 0.5, 0.1),
                                                 "user": PoolGeometry.of(10, 8, 4, 0.5, 0.1)})
    order = ("item#b0", "item#b1", "neg_0#b0", "neg_0#b1", "user#b0", "user#b1")
    assert pooled._virtual_order(order) == (["item", "neg_0", "user"], [8, 8, 8])
    with pytest.raises(RuntimeError, match="not consecutive"):
        pooled._virtual_order(("item#b0", "user#b0", "item#b1", "user#b1", "neg_0#b0",
                               "neg_0#b1"))
