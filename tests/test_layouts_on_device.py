"""The sparsity layouts on the `device` fixture's device: masks (dsl_dist/sparsity/unstructured/
masks.py), block layouts and their lookups (dsl_dist/sparsity/block/), growth recording and
the batch copy. tests/test_device_path.py runs them again on the forced device path, so that
the torch branches a GPU takes run in CI too."""

from __future__ import annotations

import torch
from torch import nn

import pytest

from dsl_dist.config import ConfigError
from dsl_dist.model.shards import DenseBlock
from dsl_dist.sparsity.block.hooks import _record, _Run, translate_run
from dsl_dist.sparsity.block.pool import PoolGeometry
from dsl_dist.sparsity.block.shard import PoolShard
from dsl_dist.sparsity.selection.fastops import pack_bits
from dsl_dist.sparsity.selection.hashing import position_digest
from dsl_dist.sparsity.unstructured.growth import GrowthRecorder
from dsl_dist.sparsity.unstructured.masks import MaskedShard

pytestmark = pytest.mark.cuda


def masked_shard(device: torch.device, rows: int = 40, cols: int = 13, seed: int = 0
                 ) -> tuple[MaskedShard, torch.Tensor, torch.Tensor]:
    """A shard of random weights and a random mask (both also returned on the host)."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(rows, cols, generator=generator) + 3  # no zero by chance
    mask = torch.rand(rows, cols, generator=generator) < 0.4
    shard = MaskedShard(DenseBlock("t", nn.Parameter(weights.to(device)), None), base=100)
    shard.bits = pack_bits(mask.to(device))
    return shard, weights, mask


def test_masks_zero_digest_and_keep_what_a_reference_says(device: torch.device) -> None:
    shard, weights, mask = masked_shard(device)
    rows = torch.tensor([5, 0, 5, 39, 17])
    shard.apply_(rows.to(device))
    expected = weights.clone()
    expected[rows] *= mask[rows]
    assert torch.equal(shard.shard.weight.cpu(), expected)
    shard.apply_(elements=64)  # a few rows at a time
    assert torch.equal(shard.shard.weight.cpu(), weights * mask)
    assert torch.equal(shard.keep_rows(rows.to(device)).cpu(), mask[rows].to(torch.uint8))
    positions = 100 + torch.arange(40 * 13).view(40, 13)
    for part in (slice(0, 40), slice(3, 11)):
        assert shard.active_digest(part) == (int(mask[part].sum()),
                                             position_digest(positions[part][mask[part]]))


def pool_shard(device: torch.device, widths: list[int]) -> PoolShard:
    """Rows of 4 blocks of 2 dimensions in a pool of 2.5 slots a row, laid out as `widths`,
    each block's values (row + block / 10) in both columns."""
    geometry = PoolGeometry.of(len(widths), 8, 2, density=0.5, headroom=0.25)
    table = DenseBlock("t", nn.Parameter(torch.zeros(geometry.capacity, 2, device=device)), None)
    shard = PoolShard(table, geometry, block_base=0)
    shard.set_widths(torch.tensor(widths, dtype=torch.uint8, device=device))
    for row, width in enumerate(widths):
        for block in range(width):
            shard.shard.weight.data[int(shard.rowptr[row]) + block] = row + block / 10
    return shard


def virtual(widths: list[int]) -> torch.Tensor:
    """What `pool_shard`'s rows look like to the model."""
    return torch.tensor([[row + block / 10 if block < width else 0.0
                          for block in range(4) for _ in range(2)]
                         for row, width in enumerate(widths)])


def test_block_layouts_move_keep_and_zero_blocks(device: torch.device) -> None:
    shard = pool_shard(device, [2, 0, 1, 4, 1, 0, 2, 2])
    assert shard.active_blocks == 12 and shard.capacity == shard.zero_slot >= 12
    assert torch.equal(shard.virtual_rows().cpu(), virtual([2, 0, 1, 4, 1, 0, 2, 2]))
    new = [1, 1, 2, 4, 0, 1, 2, 2]
    shard.set_widths(torch.tensor(new, dtype=torch.uint8, device=device))
    kept = virtual([min(a, b) for a, b in zip([2, 0, 1, 4, 1, 0, 2, 2], new)])
    assert torch.equal(shard.virtual_rows().cpu(), kept)  # kept blocks moved, grown ones zero
    assert torch.equal(shard.shard.weight[shard.active_blocks:].cpu(),
                       torch.zeros(shard.shard.num_rows - shard.active_blocks, 2))
    positions = [row * 4 + block for row, width in enumerate(new) for block in range(width)]
    assert shard.active_digest() == (13, position_digest(torch.tensor(positions)))
    with pytest.raises(ConfigError, match="sparsity.block.headroom: too small for table t"):
        shard.set_widths(torch.full((8,), 4, dtype=torch.uint8, device=device))


def test_block_lookups_pool_the_active_blocks_and_capture_growth(device: torch.device) -> None:
    widths = [2, 0, 1, 4, 1, 0, 2, 2]
    shard = pool_shard(device, widths)
    shard.shard.weight.data[shard.zero_slot] = 7.0  # what an optimizer step may leave there
    run = _Run(0, 8, 0, 2, shard)  # two virtual features of 4 block features each
    stride, bags = 3, [[3, 0], [], [6, 6, 3], [2], [7], [0, 1]]  # feature 0's, then 1's
    ids = torch.tensor([shard.geometry.proxy(torch.tensor(r)) for r in sum(bags[:3], [])])
    ids = torch.cat([ids] * 4 + [torch.tensor([shard.geometry.proxy(torch.tensor(r)) for r in
                                               sum(bags[3:], [])])] * 4).to(device)
    lengths = torch.tensor([len(b) for b in bags[:3]] * 4 + [len(b) for b in bags[3:]] * 4)
    counts = [5] * 4 + [4] * 4
    shard.clear_zero_slot()
    slots, captured = translate_run(run, ids, None, counts, lengths.to(device), stride, True)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)[:-1]])
    pooled = nn.functional.embedding_bag(slots, shard.shard.weight, offsets.to(device),
                                         mode="sum")
    table = virtual(widths).view(8, 4, 2)
    for feature in range(8):
        for sample in range(stride):
            rows = bags[(feature // 4) * 3 + sample]
            expected = sum((table[r, feature % 4] for r in rows), torch.zeros(2))
            assert torch.equal(pooled[feature * stride + sample].cpu(), expected)
    # growth: per row, the step's gradient of its next block (and of its last active one),
    # summed over its lookups, absolute, summed over the block's columns
    grad = torch.randn(stride, 8 * 2, generator=torch.Generator().manual_seed(0))
    _record(grad.to(device), [captured])
    expected = {"next": torch.zeros(8, 2), "last": torch.zeros(8, 2)}
    for feature in range(8):
        for sample in range(stride):
            for r in bags[(feature // 4) * 3 + sample]:
                for kind, block in (("next", widths[r]), ("last", widths[r] - 1)):
                    if feature % 4 == block:
                        expected[kind][r] += grad[sample, 2 * feature:2 * feature + 2]
    for kind, statistic in (("next", shard.grow_next), ("last", shard.grow_last)):
        assert statistic.dtype == torch.bfloat16
        assert torch.allclose(statistic.float().cpu(), expected[kind].abs().sum(1), rtol=1e-2,
                              atol=1e-6), kind
    assert bool(shard.grow_next.any()) and bool(shard.grow_last.any())


def test_growth_adds_the_gradient_of_every_looked_up_row(device: torch.device) -> None:
    shard, _, mask = masked_shard(device, rows=6, cols=4)
    recorder = GrowthRecorder([], world_size=1)
    grad = torch.arange(12.0).view(3, 4).to(device)  # 3 samples, one feature of 4 columns
    ids = torch.tensor([2, 5, 2, 0]).to(device)
    bags = torch.tensor([0, 0, 1, 2]).to(device)  # sample 0 holds rows 2 and 5
    masked = [(torch.tensor([1, 3, 4]).to(device), slice(0, 4), shard)]
    out = recorder._on_grad(grad, {1: [(ids, bags, slice(0, 4), None)]}, {1: shard}, masked)
    expected = torch.zeros(6, 4)
    expected[2] = grad[0].cpu() + grad[1].cpu()
    expected[5] = grad[0].cpu()
    expected[0] = grad[2].cpu()
    assert torch.equal(shard.growth.float().cpu(), expected)
    assert torch.equal(out.cpu(), grad.cpu() * mask[[1, 3, 4]])


def test_batches_copy_to_the_device_from_pinned_memory_on_cuda(device: torch.device) -> None:
    from torchrec import KeyedJaggedTensor

    from dsl_dist.pipeline import host_batches

    batch = KeyedJaggedTensor.from_lengths_sync(keys=["user", "item"],
                                                values=torch.tensor([3, 1, 4, 1]),
                                                lengths=torch.tensor([1, 1, 1, 1]))
    prepared, = host_batches([batch], lambda b: b, pin=device.type == "cuda")
    assert prepared.values().is_pinned() == (device.type == "cuda")
    moved = prepared.to(device, non_blocking=True)
    assert moved.values().device.type == device.type
    assert torch.equal(moved.values().cpu(), batch.values())
    assert moved.length_per_key() == [2, 2]
