"""The NumPy paths of dsl_dist/sparsity/fastops.py give torch's results."""

from __future__ import annotations

import torch

from dsl_dist.sparsity.fastops import (any_per_row, compress, flat_nonzero, multiply_rows_,
                                       pack_bits, unpack_bits)


def test_bool_primitives_match_torch() -> None:
    generator = torch.Generator().manual_seed(0)
    for density in (0.0, 0.01, 0.5, 1.0):
        mask = torch.rand(300, 7, generator=generator) < density
        assert torch.equal(flat_nonzero(mask), torch.nonzero(mask.view(-1)).view(-1))
        assert torch.equal(flat_nonzero(mask.t()), torch.nonzero(mask.t().reshape(-1)).view(-1))
        assert torch.equal(any_per_row(mask), mask.any(1))
        values = torch.randint(-5, 5, (mask.numel(),), generator=generator, dtype=torch.int32)
        assert torch.equal(compress(values, mask.view(-1)), values[mask.view(-1)])


def test_multiply_rows_touches_only_the_given_rows_and_allows_repeats() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(50, 8, generator=generator))  # like a table
    keep = (torch.rand(50, 8, generator=generator) < 0.3).view(torch.uint8)
    rows = torch.tensor([3, 7, 3, 49, 0, 7])
    expected = weight.detach().clone()
    expected[rows.unique()] *= keep[rows.unique()]
    with torch.no_grad():
        multiply_rows_(weight, rows, keep[rows])
    assert torch.equal(weight, expected)
    assert not torch.equal(expected, weight * keep)  # rows outside `rows` kept their values


def test_bits_pack_eight_columns_a_byte_and_unpack_exactly() -> None:
    generator = torch.Generator().manual_seed(2)
    for cols in (4, 8, 12, 64):
        mask = torch.rand(33, cols, generator=generator) < 0.3
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.shape == (33, (cols + 7) // 8)
        assert torch.equal(unpack_bits(packed, cols), mask)
        assert int(packed[0, 0]) >> 7 == int(mask[0, 0])  # first column, high bit
