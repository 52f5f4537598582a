"""train.pipeline: TorchRec's TrainPipelineSparseDist trains what the plain loop trains, on 2
real ranks (gloo on CPU: the pipeline runs there too, without CUDA streams), and a run
checkpointed while the pipeline holds the next batches resumes exactly; `auto` picks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from test_checkpoint import assert_same_tensors, final_checkpoint, tensors
from test_config import load
from test_launchers import environment, record, torchrun

RUN = ["data.batch_size=32", "model.embedding_dim=16", "train.max_steps=12",
       "checkpoint.every=5", "eval.every_epochs=0", "train.progress=false",
       "model.sharding_type=row_wise"]


def test_auto_takes_the_pipeline_for_several_gpus_only() -> None:
    from dsl_dist.pipeline import chosen_pipeline

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [chosen_pipeline("auto", n, d) for n, d in ((1, cpu), (2, cpu), (1, cuda), (2, cuda))
            ] == ["plain", "plain", "plain", "sparse_dist"]
    assert chosen_pipeline("sparse_dist", 1, cpu) == "sparse_dist"
    assert chosen_pipeline("plain", 4, cuda) == "plain"
    assert chosen_pipeline("auto", 2, cuda, traceable=False) == "plain"


def test_sparse_dist_refuses_a_model_it_cannot_trace() -> None:
    from dsl_dist.config import ConfigError
    from dsl_dist.pipeline import chosen_pipeline

    with pytest.raises(ConfigError, match="train.pipeline=sparse_dist: .* cannot trace"):
        chosen_pipeline("sparse_dist", 2, torch.device("cpu"), traceable=False)


def test_an_unknown_pipeline_is_refused_by_name() -> None:
    from dsl_dist.config import ConfigError

    with pytest.raises(ConfigError, match="train.pipeline"):
        load("train.pipeline=overlapped").validate()


def train(source: Path, prepared: Path, run_dir: Path, *extra: str) -> None:
    torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train",
             f"data.source={source}", f"data.path={prepared}", f"run_dir={run_dir}", *RUN,
             *extra, env=environment())


@pytest.mark.multiprocess
@pytest.mark.parametrize("sparsity", [["sparsity=dsl", "sparsity.density=0.3",
                                       "sparsity.delta_t=4"],
                                      ["sparsity=block_dsl", "sparsity.density=0.3",
                                       "sparsity.delta_t=4", "sparsity.block.size=4"]])
def test_the_pipeline_trains_and_resumes_like_the_plain_loop(sparsity: list[str],
                                                             clustered_source: Path,
                                                             tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    runs = {name: tmp_path / name for name in ("plain", "sparse_dist")}
    for name, run_dir in runs.items():
        train(clustered_source, prepared, run_dir, f"train.pipeline={name}", *sparsity)
    assert record(runs["plain"]) == record(runs["sparse_dist"])
    assert record(runs["plain"])["update"], "the runs updated"
    assert_same_tensors(tensors(final_checkpoint(runs["plain"]), tmp_path),
                        tensors(final_checkpoint(runs["sparse_dist"]), tmp_path))
    # stopped after its step-10 checkpoint, taken while the pipeline held steps 11 and 12
    restarted = tmp_path / "restarted"
    shutil.copytree(runs["sparse_dist"], restarted)
    shutil.rmtree(restarted / "checkpoints" / "step-000000012")
    train(clustered_source, prepared, restarted, "train.pipeline=sparse_dist", *sparsity)
    assert record(restarted) == record(runs["plain"])
    assert_same_tensors(tensors(final_checkpoint(restarted), tmp_path),
                        tensors(final_checkpoint(runs["plain"]), tmp_path))
