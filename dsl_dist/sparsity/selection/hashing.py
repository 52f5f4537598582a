"""Hashes of global positions: the tie-break order of selections, mask and layout digests, and
the uniform values of random choices, each a pure function of (seed, position) so that any
world size and sharding computes the same."""

from __future__ import annotations

import torch

POSITION_SCRAMBLE = 0x9E3779B97F4A7C15 - (1 << 64)
"""splitmix64's golden-ratio constant as a signed int64. Odd, so multiplying by it permutes
[0, 2**bits): tie-breaks and mask digests use it to scramble global positions."""
DIGEST_BITS = 32
_MIX_1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX_2 = 0x94D049BB133111EB - (1 << 64)


def position_digest(positions: torch.Tensor) -> int:
    """The sum of a DIGEST_BITS-bit hash of each position (the top bits of position *
    POSITION_SCRAMBLE): masks and layouts digest their active positions with it."""
    hashes = (positions * POSITION_SCRAMBLE) >> (64 - DIGEST_BITS)
    return int((hashes & ((1 << DIGEST_BITS) - 1)).sum())


def uniform_hash(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """A float32 in [0, 1) per position, a pure function of (seed, position) (splitmix64)."""
    seed_term = (seed * _MIX_2 + (1 << 63)) % (1 << 64) - (1 << 63)  # wrapped to int64
    x = positions * POSITION_SCRAMBLE + seed_term
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX_1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX_2
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 40) & 0xFFFFFF).to(torch.float32) / float(1 << 24)
