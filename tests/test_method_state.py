"""The state-key adapter (dsl_dist/serving/method_state.py): export reads each table in the
layout its method's spec names, never by the method's name, and refuses state it cannot read."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors", reason="the export format; absent from bare GPU images")
from dsl_dist.serving.artifact import decode  # noqa: E402
from dsl_dist.serving.method_state import UnknownState, encode_table, needed  # noqa: E402

ROWS, DIM = 6, 8
CFG = SimpleNamespace(model=SimpleNamespace(embedding_dim=DIM),
                      sparsity=SimpleNamespace(block=SimpleNamespace(size=4)))


def weight() -> np.ndarray:
    return np.arange(ROWS * DIM, dtype=np.float32).reshape(ROWS, DIM) + 1


def test_a_mask_keeps_exactly_its_weights() -> None:
    mask = torch.rand(ROWS, DIM, generator=torch.Generator().manual_seed(0)) < 0.3
    tensors = {"sparsity.user.mask": mask}
    table = encode_table("user", "mask", tensors, set(tensors) | {"sparsity.user.grad"}, weight(),
                         CFG)
    np.testing.assert_array_equal(decode(table), np.where(mask.numpy(), weight(), 0))


def test_blocks_keep_their_prefix_of_each_row() -> None:
    widths = torch.tensor([0, 1, 2, 0, 1, 0])
    blocks = torch.arange(int(widths.sum()) * 4, dtype=torch.float32).reshape(-1, 4) + 1
    tensors = {"sparsity.item.widths": widths, "sparsity_blocks.item.0": blocks}
    out = decode(encode_table("item", "blocks", tensors, set(tensors), weight(), CFG))
    assert out.shape == (ROWS, DIM)
    assert (out[widths.numpy() == 0] == 0).all()
    np.testing.assert_array_equal(out[2], blocks[1:3].reshape(-1).numpy())
    empty = {"sparsity.item.widths": torch.zeros(ROWS, dtype=torch.long)}
    assert not decode(encode_table("item", "blocks", empty, set(empty), weight(), CFG)).any()


@pytest.mark.parametrize("layout", ["dense", "mask", "blocks"])
def test_a_table_without_sparsity_state_is_dense(layout: str) -> None:
    keys = {"model.user.weight", "sparsity.item.mask"}  # a method that left `user` whole
    np.testing.assert_array_equal(decode(encode_table("user", layout, {}, keys, weight(), CFG)),
                                  weight())


@pytest.mark.parametrize("layout", ["dense", "mask", "blocks"])
def test_state_not_of_the_layout_is_refused_not_exported_dense(layout: str) -> None:
    with pytest.raises(UnknownState, match=r"table 'user': sparsity state \['sparsity.user"):
        encode_table("user", layout, {}, {"sparsity.user.scores", "model.user.weight"},
                     weight(), CFG)


def test_export_reads_the_tables_and_its_layout_only() -> None:
    assert needed("model.embeddings.user.weight", "dense")
    assert needed("sparsity.user.mask", "mask") and needed("sparsity.item.widths", "blocks")
    assert needed("sparsity_blocks.item.0", "blocks")
    assert not needed("sparsity.user.mask", "blocks")
    assert not needed("sparsity.user.grad_accumulator", "mask")
    assert not needed("optim.state.user.exp_avg", "mask")
