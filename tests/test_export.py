"""Export (dsl_dist/serving/export.py) and the Python serving API (dsl_dist/serving/inference.py)
on short 2-rank lastfm runs (conftest.EXPORT_RUNS): the artifact holds exactly the checkpoint's
active weights in about as many bytes as they need, its top-20 reproduces the run's own
evaluation, and bad input is refused with nothing lost."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="the export format; absent from bare GPU images")
import torch  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import EXPORT_RUNS
from dsl_dist.checkpoint import CheckpointError, complete_checkpoints, fingerprint
from dsl_dist.commands import main as dsl_dist_main
from dsl_dist.report.runs import last_event
from dsl_dist.report.served import metrics_at, split_items
from dsl_dist.serving.artifact import WEIGHTS, ArtifactError, decode, read_artifact
from dsl_dist.config.compose import load_config
from dsl_dist.serving.export import ExportError, export, run_config
from dsl_dist.serving.inference import UnknownUsers, load
from dsl_dist.serving.models import NotServed, serving_module

pytestmark = pytest.mark.multiprocess


def checkpoint_tensors(run_dir: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The final checkpoint's tensors, whole, through DCP's own conversion (not export's)."""
    out = scratch / f"{run_dir.name}.pt"
    dcp_to_torch_save(complete_checkpoints(run_dir / "checkpoints")[0], out)
    state = torch.load(out, weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"sparsity.{k}": v for k, v in state.get("sparsity", {}).items()}}


@pytest.mark.parametrize("name", list(EXPORT_RUNS))
def test_top20_reproduces_the_runs_evaluation(name: str, lastfm_runs: dict[str, Path],
                                              lastfm_artifacts: dict[str, Path]) -> None:
    model = load(lastfm_artifacts[name])
    test = split_items(Path(load_config(lastfm_runs[name] / "config.yaml").data.path))
    recs = model.recommend([model.user_ids[u] for u in test.users], k=20)
    item_index = {raw: i for i, raw in enumerate(model.item_ids)}
    served = metrics_at([[item_index[i] for i in items] for items in recs.items], test, 20)
    run = last_event(lastfm_runs[name], "eval")
    assert run["users"] == len(test.users)
    for metric, value in served.items():
        assert abs(value - run[metric]) <= 1e-6, (metric, value, run[metric])
    assert all(np.all(np.diff(s) <= 0) for s in recs.scores)


@pytest.mark.parametrize("name", ["mf-dsl", "lightgcn-dsl", "mf-block_dsl"])
def test_a_sparse_export_holds_exactly_the_budget(name: str, lastfm_runs: dict[str, Path],
                                                  lastfm_artifacts: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """Exactly `budget` weights are stored, those of the checkpoint's masks (or blocks). A few
    may be exactly 0: weights grown at the last update start at 0, and rows that no batch
    looked up since have not moved them; nothing else is nonzero."""
    budget = last_event(lastfm_runs[name], "update")["budget"]
    artifact = read_artifact(lastfm_artifacts[name])
    stored = {t: decode(table) for t, table in artifact.tables.items()}
    assert sum(table.active for table in artifact.tables.values()) == budget
    nonzero = sum(int(np.count_nonzero(w)) for w in stored.values())
    assert 0.5 * budget < nonzero <= budget
    if name.endswith("block_dsl"):
        block = artifact.tables["user"].block
        assert sum(int(t.tensors["widths"].astype(np.int64).sum()) * block
                   for t in artifact.tables.values()) == budget
        return
    saved = checkpoint_tensors(lastfm_runs[name], tmp_path)
    assert sum(int(saved[f"sparsity.{t}.mask"].sum()) for t in stored) == budget
    for table, weights in stored.items():
        mask = saved[f"sparsity.{table}.mask"]
        expected = saved[f"model.embeddings.embedding_bags.{table}.weight"] * mask
        assert torch.equal(torch.from_numpy(weights), expected), table


def test_a_dense_export_keeps_every_weight(lastfm_runs: dict[str, Path],
                                           lastfm_artifacts: dict[str, Path],
                                           tmp_path: Path) -> None:
    artifact = read_artifact(lastfm_artifacts["mf-dense"])
    saved = checkpoint_tensors(lastfm_runs["mf-dense"], tmp_path)
    for table, encoded in artifact.tables.items():
        assert encoded.layout == "dense"
        assert torch.equal(torch.from_numpy(decode(encoded)),
                           saved[f"model.embeddings.embedding_bags.{table}.weight"])


@pytest.mark.parametrize("name", list(EXPORT_RUNS))
def test_the_weights_take_at_most_1_2_times_what_they_need(
        name: str, lastfm_artifacts: dict[str, Path]) -> None:
    """Active weights × 4 B + the smallest index of each table's kind: none (dense), a bit per
    position or CSR with one-byte columns (weights), a byte per row (blocks)."""
    artifact = read_artifact(lastfm_artifacts[name])
    need = 0
    for table in artifact.tables.values():
        rows, dim = table.shape
        t = table.tensors
        active = {"dense": lambda: rows * dim,
                  "bitmask": lambda: int(np.unpackbits(t["mask"]).sum()),
                  "csr": lambda: len(t["columns"]),
                  "blocks": lambda: int(t["widths"].astype(np.int64).sum()) * table.block,
                  }[table.layout]()
        index = {"dense": 0, "blocks": rows,
                 "bitmask": min(math.ceil(rows * dim / 8), active + 4 * (rows + 1)),
                 "csr": min(math.ceil(rows * dim / 8), active + 4 * (rows + 1))}[table.layout]
        need += 4 * active + index
    size = (lastfm_artifacts[name] / WEIGHTS).stat().st_size
    assert size <= 1.2 * need, (size, need)
    assert artifact.meta["bytes"]["bound_bytes"] <= 1.2 * need


def test_export_refuses_a_non_empty_out_and_keeps_it(lastfm_runs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory.*--overwrite"):
        export(lastfm_runs["mf-dsl"], out)
    assert (out / "keep.txt").read_text() == "mine"
    export(lastfm_runs["mf-dsl"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and read_artifact(out).meta["model"]["name"] == "mf"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind


def test_export_refuses_a_run_without_a_complete_checkpoint(lastfm_runs: dict[str, Path],
                                                            tmp_path: Path,
                                                            capsys: pytest.CaptureFixture
                                                            ) -> None:
    run = tmp_path / "run"
    shutil.copytree(lastfm_runs["mf-dsl"], run)
    (final,) = complete_checkpoints(run / "checkpoints")
    final.rename(final.with_name(f".{final.name}.partial"))
    with pytest.raises(SystemExit) as exit_:
        dsl_dist_main(["export", str(run), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_corrupt_checkpoint(lastfm_runs: dict[str, Path],
                                             tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(lastfm_runs["mf-dsl"], run)
    (final,) = complete_checkpoints(run / "checkpoints")
    shard = sorted(final.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} does not match its checksum"):
        export(run, tmp_path / "out")


def test_export_refuses_what_it_cannot_serve(lastfm_runs: dict[str, Path],
                                             tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="neither a run directory"):
        export(tmp_path, tmp_path / "out")
    config = lastfm_runs["mf-dense"] / "config.yaml"
    other = tmp_path / "config.yaml"
    other.write_text(config.read_text().replace("name: mf", "name: neumf"))
    neumf = load_config(other)  # in NeuMF's schema: its own section at its defaults
    with pytest.raises(ExportError, match="model.name='neumf': not exported: NeuMF scores "
                       "through an MLP"):
        run_config(tmp_path, {"config": fingerprint(neumf)}, other)
    with pytest.raises(ExportError, match="does not belong to"):
        run_config(tmp_path, {"config": fingerprint(load_config(config))}, other)
    other.write_text(config.read_text().replace("name: mf", "name: unheard_of"))
    with pytest.raises(ExportError, match="model.name='unheard_of' is not a known model"):
        run_config(tmp_path, {"config": fingerprint(neumf)}, other)
    with pytest.raises(NotServed, match="model.name='unheard_of': no model spec"):
        serving_module("unheard_of")  # an artifact's model, as inference reads it


def test_export_refuses_an_unknown_method_by_name(lastfm_runs: dict[str, Path],
                                                  tmp_path: Path) -> None:
    config = lastfm_runs["mf-dense"] / "config.yaml"
    assert "name: dense" in config.read_text()
    other = tmp_path / "config.yaml"
    other.write_text(config.read_text().replace("name: dense", "name: unheard_of"))
    cfg = load_config(config)
    with pytest.raises(ExportError, match="sparsity.name='unheard_of' is not a known method"):
        run_config(tmp_path, {"config": fingerprint(cfg)}, other)


def test_recommend_refuses_bad_input(lastfm_artifacts: dict[str, Path]) -> None:
    model = load(lastfm_artifacts["mf-dsl"])
    with pytest.raises(UnknownUsers, match="unknown user id"):
        model.recommend([model.user_ids[0], "nobody"])
    for k in (0, model.num_items + 1, 2.5, True):
        with pytest.raises(ValueError, match=f"k={k!r}"):
            model.recommend([model.user_ids[0]], k=k)
    user = model.user_ids[0]
    seen = model.positives[model.indptr[0]:model.indptr[1]]
    everything = model.recommend([user], k=model.num_items)
    assert len(everything.items[0]) == model.num_items - len(seen)
    assert not {model.item_ids[i] for i in seen} & set(everything.items[0])
    assert len(model.recommend([user], k=model.num_items, exclude_train=False).items[0]) == \
        model.num_items


def test_a_corrupt_artifact_is_refused(lastfm_artifacts: dict[str, Path],
                                       tmp_path: Path) -> None:
    copy = tmp_path / "artifact"
    shutil.copytree(lastfm_artifacts["mf-dsl"], copy)
    weights = copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} does not match its checksum"):
        load(copy)
    meta = json.loads((copy / "artifact.json").read_text())
    (copy / "artifact.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ArtifactError, match="format 99"):
        load(copy)


def test_lightgcn_propagated_at_load_time_equals_at_export(lastfm_runs: dict[str, Path],
                                                           lastfm_artifacts: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """An artifact without propagated embeddings (smaller) propagates when loaded, to the same
    embeddings (full propagation: the cheap one to compute here)."""
    stored = load(lastfm_artifacts["lightgcn-dense"])
    meta = export(lastfm_runs["lightgcn-dense"], tmp_path / "bare", propagated=False)
    assert "propagated.safetensors" not in meta["files"]
    computed = load(tmp_path / "bare")
    assert torch.allclose(computed.user_vectors, stored.user_vectors, atol=1e-6)
    assert torch.allclose(computed.item_vectors, stored.item_vectors, atol=1e-6)
    assert not torch.allclose(computed.user_vectors,
                              torch.from_numpy(decode(read_artifact(tmp_path / "bare")
                                                      .tables["user"])), atol=1e-3)


def test_the_faiss_index_finds_most_of_the_exact_top20(lastfm_artifacts: dict[str, Path]
                                                       ) -> None:
    exact = load(lastfm_artifacts["mf-dsl"])
    approximate = load(lastfm_artifacts["mf-dsl"], approximate=True)
    users = np.arange(0, exact.num_users, 4)
    _, truth = exact.top_items(users, 20)
    _, found = approximate.top_items(users, 20)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 20 for a, b in zip(truth, found)])
    assert recall >= 0.9
    for user, items in zip(users, found):
        seen = set(exact.positives[exact.indptr[user]:exact.indptr[user + 1]].tolist())
        assert not seen & set(items.tolist())
