"""The paper's models on sharded tables, on real ranks: LightGCN's two propagations agree, every
model learns (dense and under DSL, dense layers included), NeuMF's evaluation scores are its
training logits, and a model with dense layers resumes exactly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ranks import run_ranks
from test_checkpoint import assert_same_tensors, final_checkpoint, tensors
from test_config import load
from test_launchers import record


def common(source: Path, tmp_path: Path) -> list[str]:
    return [f"data.source={source}", f"data.path={tmp_path / 'prepared'}", "data.batch_size=32",
            "model.embedding_dim=16", "train.lr=0.1", "train.log_every=0"]


def train_and_embed_items(overrides: list[str]) -> dict:
    """Trains, then returns the losses and every final item embedding."""
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.train import build_trainer

    trainer = build_trainer(load(*overrides))
    metrics = trainer.fit()
    model = trainer.model.module
    items = model.item_side(trainer.ctx.device, 16)[-trainer.manifest.num_items:]
    shutdown_distributed()
    return {"metrics": metrics, "items": items.tolist()}


@pytest.mark.multiprocess
def test_lightgcn_bags_and_full_propagation_agree(clustered_source: Path, tmp_path: Path) -> None:
    """Same weights, same batches: exact bags (every weight kept) and full-graph propagation
    train the same model; truncated bags train another."""
    base = [*common(clustered_source, tmp_path), "model=lightgcn", "train.epochs=3", "model.sharding_type=row_wise", "model.lightgcn.num_layers=2"]
    runs = {name: run_ranks(train_and_embed_items, 2, tmp_path / name,
                            base + [*extra, f"run_dir={tmp_path / ('run-' + name)}"])
            for name, extra in (("bags", ["model.lightgcn.max_neighbours=0"]),
                                ("full", ["model.lightgcn.propagation=full"]),
                                ("truncated", ["model.lightgcn.max_neighbours=2"]))}
    exact, full, truncated = (torch.tensor(runs[n][0]["items"]) for n in ("bags", "full",
                                                                           "truncated"))
    assert exact.shape == (60, 16)
    assert torch.allclose(exact, full, rtol=1e-4, atol=1e-5), (exact - full).abs().max()
    assert not torch.allclose(exact, truncated, rtol=1e-2, atol=1e-3)
    losses = {n: [e["loss"] for e in record(tmp_path / f"run-{n}")["epoch"]] for n in runs}
    assert losses["bags"] == pytest.approx(losses["full"], rel=1e-5)
    assert losses["bags"][-1] < 0.8 * losses["bags"][0]


def train_sparse_and_check(overrides: list[str]) -> dict:
    """Trains; returns the metrics and, under DSL, whether every pruned weight (tables and
    dense layers alike) is zero and the active count."""
    from dsl_dist.distributed import shutdown_distributed
    from dsl_dist.train import build_trainer

    trainer = build_trainer(load(*overrides))
    metrics = trainer.fit()
    result = {"metrics": metrics}
    if trainer.cfg.sparsity.name != "dense":
        shards = trainer.sparsity.shards
        result["zeros"] = all(bool((s.shard.weight[~s.mask] == 0).all()) if hasattr(s, "mask")
                              else bool((s.virtual_rows().view(s.num_rows, -1, s.geometry.block)
                                         .abs().sum(2).ne(0).sum(1) <= s.widths.long()).all())
                              for s in shards)
        result["sparsified"] = sorted({s.table for s in shards})  # this rank's shards
        result["active"] = sum(trainer.sparsity.active_per_table()[0].values())
    shutdown_distributed()
    return result


DSL = ["sparsity=dsl", "sparsity.density=0.4", "sparsity.delta_t=4", "sparsity.growth=accumulated"]
BLOCKS = ["sparsity=block_dsl", "sparsity.density=0.4", "sparsity.delta_t=4",
          "sparsity.growth=accumulated", "sparsity.block.size=4",
          "sparsity.block.headroom=0.25"]  # shards of 30 rows: 10% is a few blocks


@pytest.mark.multiprocess
@pytest.mark.parametrize("model, extra, sparsified", [
    ("lightgcn", ["model.sharding_type=table_wise", *DSL], ["item", "user"]),
    ("lightgcn", ["model.lightgcn.propagation=full", "model.sharding_type=column_wise"], None),
    ("neumf", ["model.sharding_type=row_wise", "data.num_negatives=4", "train.dense_lr=0.01",
               *DSL, "sparsity.tables=[user_mlp,item_mlp]", "sparsity.dense_parameters=[tower.*]"],
     ["item_mlp", "tower.0.bias", "tower.0.weight", "tower.1.bias", "tower.1.weight",
      "tower.2.bias", "tower.2.weight", "user_mlp"]),
    ("multvae", ["model.embedding_dim=32", "model.multvae.latent_dim=8", "data.batch_size=8",
                 "train.dense_lr=0.01", "model.multvae.anneal_steps=20",
                 "model.sharding_type=table_wise", *DSL, "sparsity.scope=per_table",
                 "sparsity.dense_parameters=[*]"],
     ["decode.bias", "decode.weight", "encode.bias", "encode.weight", "encoder_bias",
      "item_bias", "item_decoder", "item_encoder"]),
    # structured DSL: the same models with their tables in block pools
    ("mf", ["model.sharding_type=row_wise", *BLOCKS], ["item", "user"]),
    ("lightgcn", ["model.sharding_type=table_wise", *BLOCKS], ["item", "user"]),
    ("lightgcn", ["model.lightgcn.propagation=full", "model.sharding_type=row_wise", *BLOCKS],
     ["item", "user"]),
    ("neumf", ["model.sharding_type=row_wise", "data.num_negatives=4", "train.dense_lr=0.01",
               *BLOCKS, "sparsity.tables=[user_mlp,item_mlp]", "sparsity.scope=per_table"],
     ["item_mlp", "user_mlp"]),
    ("multvae", ["model.embedding_dim=32", "model.multvae.latent_dim=8", "data.batch_size=8",
                 "train.dense_lr=0.01", "model.multvae.anneal_steps=20",
                 "model.sharding_type=table_wise", *BLOCKS, "sparsity.scope=per_table"],
     ["item_decoder", "item_encoder"]),
])
def test_every_model_learns_on_two_ranks(model: str, extra: list[str],
                                         sparsified: list[str] | None, clustered_source: Path,
                                         tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = run_ranks(train_sparse_and_check, 2, tmp_path / "out",
                        [*common(clustered_source, tmp_path), f"model={model}", "train.epochs=6",
                         *extra, f"run_dir={run_dir}"])
    assert results[0]["metrics"] == results[1]["metrics"], "ranks disagree on the metrics"
    events = record(run_dir)
    losses = [e["loss"] for e in events["epoch"]]
    assert losses[-1] < 0.9 * losses[0], losses
    # users prefer their cluster's 15 of the 60 items: random ranking's Recall@20 is about 0.4
    assert results[0]["metrics"]["recall@20"] > 0.6, results[0]["metrics"]
    if sparsified:
        budget = events["update"][0]["budget"]
        assert all(u["active"] == budget for u in events["update"]) and len(events["update"]) > 5
        assert sorted(events["update"][-1]["density"]) == sparsified
        for result in results:
            assert result["zeros"] and result["active"] == budget
        assert sorted({t for r in results for t in r["sparsified"]}) == sparsified


def neumf_logits_and_scores() -> dict:
    from torchrec import KeyedJaggedTensor

    from dsl_dist.config import ModelConfig, TrainConfig
    from dsl_dist.distributed import init_distributed, shutdown_distributed
    from dsl_dist.model.neumf import NeuMF
    from dsl_dist.model.shards import init_normal_, local_table_shards
    from dsl_dist.model.sharding import shard_model

    ctx = init_distributed("gloo")
    torch.manual_seed(0)
    model = shard_model(NeuMF(7, 5, 8, 4, [6, 3], num_negatives=1), ModelConfig(embedding_dim=8),
                        TrainConfig(), ctx)
    init_normal_(local_table_shards(model), 0.5, seed=0)
    net = model.module
    users = torch.tensor([0, 3, 6])
    items = net.item_side(ctx.device, 2)
    side = net.user_side(items, users, None)
    scores = net.score(items, side, 0, 5)
    assert torch.equal(torch.cat([net.score(items, side, 0, 2), net.score(items, side, 2, 5)], 1),
                       scores), "scoring by blocks of items changes the scores"
    pairs = [(u, i) for u in users.tolist() for i in range(5)]
    lengths = torch.ones(3 * len(pairs), dtype=torch.int32)
    batch = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "neg_0"], lengths=lengths,
        values=torch.tensor([u for u, _ in pairs] + [i for _, i in pairs] * 2))
    gmf, mlp = net.gmf(batch), net.mlp(batch)
    logits = net._logits(gmf["user"], gmf["item"], net._first_layer(mlp["user"], None),
                         net._first_layer(None, mlp["item"]))
    direct = net.tower[0](torch.cat([mlp["user"], mlp["item"]], 1))
    split = net._first_layer(mlp["user"], None) + net._first_layer(None, mlp["item"])
    shutdown_distributed()
    return {"scores": scores.flatten().tolist(), "logits": logits.tolist(),
            "first_layer_split": bool(torch.allclose(direct, split, atol=1e-5))}


@pytest.mark.multiprocess
def test_neumf_evaluation_scores_are_its_training_logits(tmp_path: Path) -> None:
    result = run_ranks(neumf_logits_and_scores, 1, tmp_path)[0]
    assert result["first_layer_split"]
    assert result["scores"] == pytest.approx(result["logits"], rel=1e-5, abs=1e-6)
    assert len(set(round(s, 4) for s in result["scores"])) > 10, "scores do not vary"


@pytest.mark.multiprocess
def test_model_with_dense_layers_resumes_exactly(clustered_source: Path, tmp_path: Path) -> None:
    """Mult-VAE under DSL with its dense layers sparsified: dense (Adam) optimizer state, the
    step buffer (KL annealing, seeded noise) and the dense masks all come back."""
    overrides = [*common(clustered_source, tmp_path), "model=multvae", "model.embedding_dim=32",
                 "model.multvae.latent_dim=8", "data.batch_size=8", "train.epochs=4",
                 "model.multvae.anneal_steps=10", "train.dense_lr=0.01", *DSL,
                 "sparsity.dense_parameters=[*]", "checkpoint.every=10", "checkpoint.keep=5"]
    base = tmp_path / "base"
    run_ranks(train_sparse_and_check, 2, tmp_path / "a", overrides + [f"run_dir={base}"])
    checkpoints = sorted(p.name for p in (base / "checkpoints").iterdir())
    assert checkpoints[:2] == ["step-000000010", "step-000000020"]
    again = tmp_path / "again"
    shutil.copytree(base, again)
    for name in checkpoints[1:]:  # as if the job had died after step 10's checkpoint
        shutil.rmtree(again / "checkpoints" / name)
    run_ranks(train_sparse_and_check, 2, tmp_path / "b", overrides + [f"run_dir={again}"])
    assert record(again) == record(base)
    saved = tensors(final_checkpoint(base), tmp_path)
    assert any(k.startswith("dense_optimizer.") for k in saved)
    assert any(k.startswith("sparsity.encode.weight") for k in saved)
    assert_same_tensors(saved, tensors(final_checkpoint(again), tmp_path))
    assert math.isfinite(json.loads((base / "metrics.jsonl").read_text().splitlines()[-1])
                         ["recall@20"])
