"""The primitives of dsl_dist/sparsity/selection/fastops.py give torch's results on the CPU (the
NumPy paths) and on the `device` fixture's device (CUDA's torch paths under gpu_check)."""

from __future__ import annotations

import pytest
import torch

from dsl_dist.sparsity.selection import fastops
from dsl_dist.sparsity.selection.fastops import (compress, flat_nonzero, multiply_rows_, pack_bits,
                                       popcount, unpack_bits, zero_where_)

pytestmark = pytest.mark.cuda


def test_bool_primitives_match_torch(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    for density in (0.0, 0.01, 0.5, 1.0):
        host = torch.rand(300, 7, generator=generator) < density
        mask = host.to(device)
        assert torch.equal(flat_nonzero(mask).cpu(), torch.nonzero(host.view(-1)).view(-1))
        assert torch.equal(flat_nonzero(mask.t()).cpu(),
                           torch.nonzero(host.t().reshape(-1)).view(-1))
        assert popcount(pack_bits(mask)) == int(host.sum())
        values = torch.randint(-5, 5, (mask.numel(),), generator=generator, dtype=torch.int32)
        assert torch.equal(compress(values.to(device), mask.view(-1)).cpu(),
                           values[host.view(-1)])


def test_popcount_counts_a_mask_of_many_pieces(device: torch.device,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path counts POPCOUNT_BYTES at a time (a last piece of any length)."""
    monkeypatch.setattr(fastops, "POPCOUNT_BYTES", 48)
    generator = torch.Generator().manual_seed(2)
    for rows, cols in ((1, 1), (37, 13), (200, 64)):
        host = torch.rand(rows, cols, generator=generator) < 0.6
        assert popcount(pack_bits(host.to(device))) == int(host.sum())


def test_multiply_rows_touches_only_the_given_rows_and_allows_repeats(device: torch.device
                                                                      ) -> None:
    generator = torch.Generator().manual_seed(1)
    host = torch.randn(50, 8, generator=generator)
    weight = torch.nn.Parameter(host.to(device))  # like a table
    keep = (torch.rand(50, 8, generator=generator) < 0.3).view(torch.uint8)
    rows = torch.tensor([3, 7, 3, 49, 0, 7])
    expected = host.clone()
    expected[rows.unique()] *= keep[rows.unique()]
    with torch.no_grad():
        multiply_rows_(weight, rows.to(device), keep[rows].to(device))
    assert torch.equal(weight.detach().cpu(), expected)
    assert not torch.equal(expected, host * keep)  # rows outside `rows` kept their values


def test_bits_pack_eight_columns_a_byte_and_unpack_exactly(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(2)
    for cols in (4, 8, 12, 64):
        host = torch.rand(33, cols, generator=generator) < 0.3
        packed = pack_bits(host.to(device))
        assert packed.dtype == torch.uint8 and packed.shape == (33, (cols + 7) // 8)
        assert torch.equal(packed.cpu(), pack_bits(host))  # the device packs as NumPy does
        assert torch.equal(unpack_bits(packed, cols).cpu(), host)
        assert int(packed[0, 0]) >> 7 == int(host[0, 0])  # first column, high bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_where_zeroes_exactly_the_marked_entries(dtype: torch.dtype,
                                                      device: torch.device) -> None:
    generator = torch.Generator().manual_seed(2)
    for cols in (1, 7, 8, 13):
        host = torch.randn(40, cols, generator=generator).to(dtype)
        marked = torch.rand(40, cols, generator=generator) < 0.4
        values = host.to(device)
        zero_where_(values[5:], pack_bits(marked[5:].to(device)))  # a view, as chunks are
        expected = host.clone()
        expected[5:][marked[5:]] = 0
        assert torch.equal(values.cpu(), expected), cols
