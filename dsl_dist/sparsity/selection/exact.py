"""Exact top-k over candidates spread across ranks, exchanging only counts.

Radix selection: every score is mapped to an order-preserving 32-bit key; each round every
rank histograms one 16-bit digit of its remaining candidates' keys (`torch.bincount`) and the
histograms are summed over the ranks (`reduce_counts`), which fixes one digit of the k-th key
and narrows the remaining candidates to that digit's bin. Candidates tied at the threshold key
are resolved the same way over their global positions, smallest position first, so the choice
depends neither on how the candidates are split across ranks nor on the world size. No score or
position ever leaves its rank: only int64 count vectors are reduced.

16-bit digits make the first round do nearly all the work: one bincount over a rank's keys
leaves about n / 10**3 candidates for the second, where 8-bit digits would leave a large share
of them (magnitudes of one scale share their top byte) for three more rounds of filtering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dsl_dist.sparsity.selection.fastops import compress, concat, flat_nonzero
from dsl_dist.sparsity.selection.hashing import POSITION_SCRAMBLE

CountReducer = Callable[[torch.Tensor], torch.Tensor]
"""Sums an int64 count tensor (same shape on every rank) over all ranks."""
PositionsOf = Callable[[torch.Tensor], torch.Tensor]
"""The positions of the candidates at some indices (into the scores), computed on demand."""

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
SCORE_BITS = 32
MAX_POSITION_BITS = 62
_HEADER = 3  # candidates, NaN candidates, ranks with a position out of range
_HEADER_SIZE = _HEADER + MAX_POSITION_BITS + 1  # + one-hot bit length (0..62) of the max position


@dataclass
class Part:
    """A rank's piece of a selection: its scores, which of them take part (None: all), and
    the global positions of the entries at given flat indices (computed for ties only)."""

    scores: torch.Tensor
    candidates: Optional[torch.Tensor]
    positions_at: PositionsOf


def select_across(parts: list[Part], k: int, *, largest: bool, reduce_counts: CountReducer,
                  position_bits: int) -> list[torch.Tensor]:
    """`select_extreme` over the entries of all `parts` of all ranks: per part, which of its
    entries are among the k extreme scores (a bool tensor shaped like its scores). Ties go by
    a fixed permutation of the global positions, so that they favour no table or region."""
    device = parts[0].scores.device if parts else torch.device("cpu")
    scores = concat([p.scores.reshape(-1) for p in parts] or [torch.empty(0, device=device)])
    candidates = None if all(p.candidates is None for p in parts) else concat(
        [(p.candidates if p.candidates is not None
          else torch.ones(p.scores.shape, dtype=torch.bool, device=device)).reshape(-1)
         for p in parts] or [torch.empty(0, dtype=torch.bool, device=device)])
    ends = torch.tensor([p.scores.numel() for p in parts], dtype=torch.int64).cumsum(0)
    starts = [0, *ends.tolist()]

    def tie_keys(tied: torch.Tensor) -> torch.Tensor:
        cuts = [0, *torch.searchsorted(tied, ends.to(tied.device)).tolist()]
        keys = torch.cat([p.positions_at(tied[a:b] - start) for p, a, b, start
                          in zip(parts, cuts, cuts[1:], starts)] or [tied.new_empty(0)])
        return keys.mul_(POSITION_SCRAMBLE).bitwise_and_((1 << position_bits) - 1)

    chosen = select_extreme(scores, tie_keys, k, largest=largest, reduce_counts=reduce_counts,
                            position_bits=position_bits, candidates=candidates)
    return [chosen[a:b].view_as(p.scores) for p, a, b in zip(parts, starts, starts[1:])]


def local_counts(counts: torch.Tensor) -> torch.Tensor:
    """The reducer of a single process (identity)."""
    return counts


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys, one per float32 score, in the same order as the scores (-0.0 and +0.0 get
    the same key). As unsigned 32-bit numbers (key + 2**31) these are the usual radix-sort keys:
    sign bit flipped for non-negative floats, all bits flipped for negative ones; int32 keeps
    them half the size of int64 and comparable with signed comparisons. Non-negative scores
    (magnitudes, DSL's usual criteria) are their own keys: the result may then share their
    memory."""
    bits = scores.contiguous().view(torch.int32)
    if not bits.numel() or int(bits.min()) >= 0:  # no sign bit set: no negative score and no -0.0
        return bits
    bits = (scores + 0.0).contiguous().view(torch.int32)  # -0.0 + 0.0 == +0.0; a new tensor
    flip = bits >> 31  # arithmetic: -1 for negative floats, 0 otherwise
    flip &= 0x7FFFFFFF
    bits ^= flip  # negative floats: reverse their order below the non-negative ones
    return bits


def _digits(values: torch.Tensor, shift: int) -> torch.Tensor:
    """Bits [shift, shift + 16) of every value (two's complement), as non-negative ints."""
    return (values >> shift).bitwise_and_(BINS - 1) if shift else values & (BINS - 1)


def _threshold_bin(histogram: torch.Tensor, k: int, largest: bool) -> tuple[int, int]:
    """The bin holding the k-th best key (best: the highest bins if largest) and the number of
    keys in the bins better than it."""
    cumulative = (histogram.flip(0) if largest else histogram).cumsum(0)
    index = int(torch.searchsorted(cumulative, k))  # first bin where the count reaches k
    passed = int(cumulative[index - 1]) if index else 0
    return (BINS - 1 - index if largest else index), passed


def narrow(histogram: torch.Tensor, k: int, largest: bool, prefix: int,
           reduce_counts: CountReducer) -> tuple[int, int, int]:
    """One radix round's decision from this rank's histogram of a digit: the digit of the
    k-th best key over all ranks appended to `prefix`, how many of the k remain to take in
    its bin, and how many keys the bin holds. Returns (prefix, k, tied)."""
    histogram = reduce_counts(histogram)
    digit, passed = _threshold_bin(histogram, k, largest)
    return (prefix << DIGIT_BITS) | digit, k - passed, int(histogram[digit])


def _radix_select(keys: torch.Tensor, count: int, k: int, bits: int, largest: bool,
                  signed: bool, reduce_counts: CountReducer,
                  candidates: Optional[torch.Tensor] = None) -> tuple[int, int, int, int]:
    """Locates the k largest (or smallest) of the `count` keys of all ranks (1 <= k <= count).

    keys: this rank's 1-D integer keys. Unsigned keys (signed=False) are all in [0, 2**bits);
    signed ones are int32 whose order is that of the unsigned keys + 2**31 - the digits below
    are those of the unsigned keys, 16 bits at a time from the top. Returns (shift, prefix,
    needed, tied): the k best are every key whose unsigned key >> shift is above (largest) or
    below (smallest) prefix, plus `needed` of the `tied` keys (a global count) with unsigned
    key >> shift == prefix; needed == tied unless shift == 0. One `reduce_counts` call of 65536
    counts per digit examined, at most ceil(bits / 16), fewer when a whole bin is taken early.
    Every decision is taken from reduced counts, so all ranks make the same calls.
    With `candidates` (bool, like keys) only those keys count (`count` of them over all ranks):
    the others get a digit of BINS in the first round, outside every bin.
    """
    shift = max(bits - 1, 0) // DIGIT_BITS * DIGIT_BITS
    prefix = 0
    remaining = keys
    while True:
        digits = _digits(remaining, shift)
        excluded = candidates is not None
        if excluded:  # + BINS for the others, without a slow masked_fill_
            digits.add_((~candidates).to(digits.dtype), alpha=BINS)
            candidates = None
        histogram = torch.bincount(digits, minlength=BINS)[:BINS]
        # the sign bit of int32 keys is the complement of the unsigned keys' top bit
        flip = BINS // 2 if signed and shift == SCORE_BITS - DIGIT_BITS else 0
        if flip:
            histogram = histogram.roll(flip)
        prefix, k, tied = narrow(histogram, k, largest, prefix, reduce_counts)
        if k == tied or shift == 0:
            return shift, prefix, k, tied
        if tied != count or excluded:  # else every remaining key is in this bin, everywhere
            remaining = compress(remaining, digits == ((prefix & (BINS - 1)) ^ flip))
        count = tied
        shift -= DIGIT_BITS


def _bin_bounds(shift: int, prefix: int, offset: int) -> tuple[int, int]:
    """The smallest and largest key (minus offset) whose unsigned key >> shift == prefix."""
    return (prefix << shift) - offset, ((prefix + 1) << shift) - 1 - offset


def select_extreme(scores: torch.Tensor, positions: torch.Tensor | PositionsOf, k: int, *,
                   largest: bool, reduce_counts: CountReducer,
                   position_bits: int = MAX_POSITION_BITS,
                   candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Marks this rank's candidates among the k largest (or smallest) scores of all ranks.

    Collective: every rank calls it with the same `k`, `largest` and `position_bits`, and its
    own candidates (possibly none).

    scores: (n,) float32 (float16/bfloat16 are widened exactly; NaN is refused).
    positions: (n,) integer global positions, unique across all ranks, in
        [0, 2**position_bits) (position_bits <= 62); or a function from candidate indices to
        their positions, called only for the candidates tied at the threshold (when computing
        every position costs more than the selection; its range is then not checked).
    k: how many candidates to select over all ranks, 0 <= k <= the global number of
        candidates.
    candidates: optional (n,) bool: only these entries take part (all of them if None); the
        others are ignored (NaN scores allowed, positions not checked). Under half of the
        entries are gathered first; more are marked among all of them (a digit offset), which
        then costs less than a gather and a scatter back.

    The k best are the k largest (or smallest) scores, -0.0 counting as +0.0; among equal scores
    at the threshold, the candidates of SMALLER position go first (for largest and smallest
    alike). The selection is therefore a function of the global (score, position) pairs alone,
    identical for every world size and split. Returns a bool (n,) tensor, False outside the
    candidates; its counts summed over the ranks equal k exactly.

    Communication, all through `reduce_counts` on int64 vectors whatever n is:
      1 call of 66 counts (candidates, NaN scores, ranks with positions out of range,
        one-hot bit length of the largest position), then nothing more if k == 0 or k == all
        candidates;
      up to 2 calls of 65536 counts (one per 16-bit digit of the score keys);
      only when equal scores straddle the k-th place, up to ceil(b / 16) calls of 65536 counts
        over the tied candidates' positions, b the bit length of the largest position of any
        rank (b <= position_bits <= 62, so at most 4).
    At most 7 calls; every rank makes the same calls with the same shapes, since each decision
    is taken from reduced counts. ValueErrors found from reduced counts (NaN anywhere, k beyond
    the total, duplicate positions at the threshold) are raised on every rank alike.

    Work per rank: a handful of vectorised passes over its n scores (keys, one bincount, one
    filter to the threshold bin, final comparisons): 10-20 ms for n = 2.6 million on one CPU
    core, where the 8-bit version that gathered its candidates first took 50-60 ms.
    """
    lazy = callable(positions)
    _check_arguments(scores, positions, k, position_bits, candidates)
    count = scores.numel() if candidates is None else int(torch.count_nonzero(candidates))
    if candidates is not None and 2 * count < candidates.numel():
        return _select_gathered(scores, positions, k, largest, reduce_counts, position_bits,
                                candidates)
    scores = scores.float()
    total, position_bit_length = _reduce_header(scores, positions, count, position_bits,
                                                reduce_counts, candidates)
    if k > total:
        raise ValueError(f"select_extreme: k={k} exceeds the {total} candidate(s) of all ranks")
    if k == 0 or k == total:
        if candidates is None or k == 0:
            return torch.full(scores.shape, k > 0, dtype=torch.bool, device=scores.device)
        return candidates.clone()

    keys = _order_keys(scores)
    shift, prefix, needed, tied = _radix_select(keys, total, k, SCORE_BITS, largest, True,
                                                reduce_counts, candidates)
    low, high = _bin_bounds(shift, prefix, 1 << (SCORE_BITS - 1))
    if needed == tied:  # the whole bin is in
        chosen = keys >= low if largest else keys <= high
        return chosen if candidates is None else chosen.logical_and_(candidates)
    # shift == 0, low == high: equal scores straddle the k-th place
    positions_of: PositionsOf = (positions if lazy else  # type: ignore[assignment]
                                 positions.to(torch.int64).__getitem__)
    return _break_ties(keys, low, largest, needed, tied, positions_of, position_bit_length,
                       reduce_counts, candidates)


def _check_arguments(scores: torch.Tensor, positions: torch.Tensor | PositionsOf, k: int,
                     position_bits: int, candidates: Optional[torch.Tensor]) -> None:
    if scores.dim() != 1 or (not callable(positions) and positions.shape != scores.shape):
        raise ValueError(f"select_extreme: scores {tuple(scores.shape)} and positions "
                         f"{tuple(positions.shape)} must be 1-D of the same length")
    if candidates is not None and (candidates.shape != scores.shape
                                   or candidates.dtype != torch.bool):
        raise ValueError(f"select_extreme: candidates must be a bool tensor shaped like the "
                         f"scores {tuple(scores.shape)}, not {candidates.dtype} "
                         f"{tuple(candidates.shape)}")
    if not scores.is_floating_point() or scores.element_size() > 4:
        raise TypeError(f"select_extreme: scores must be float32 (or narrower), not {scores.dtype}")
    if not callable(positions) and (positions.is_floating_point() or positions.is_complex()
                                    or positions.dtype == torch.bool):
        raise TypeError(f"select_extreme: positions must be integers, not {positions.dtype}")
    if not 0 <= position_bits <= MAX_POSITION_BITS:
        raise ValueError(f"select_extreme: position_bits={position_bits} outside "
                         f"[0, {MAX_POSITION_BITS}]")
    if k < 0:
        raise ValueError(f"select_extreme: k={k} is negative")


def _select_gathered(scores: torch.Tensor, positions: torch.Tensor | PositionsOf, k: int,
                     largest: bool, reduce_counts: CountReducer, position_bits: int,
                     candidates: torch.Tensor) -> torch.Tensor:
    """Few candidates (the active weights at a drop): every pass costs less over them alone
    than over all entries, the gather and the scatter back included."""
    index = flat_nonzero(candidates).to(candidates.device)
    picked = select_extreme(
        scores.index_select(0, index),
        ((lambda i: positions(index.index_select(0, i))) if callable(positions)
         else positions.index_select(0, index)),
        k, largest=largest, reduce_counts=reduce_counts, position_bits=position_bits)
    return torch.zeros_like(candidates).index_fill_(0, compress(index, picked), True)


def _reduce_header(scores: torch.Tensor, positions: torch.Tensor | PositionsOf, count: int,
                   position_bits: int, reduce_counts: CountReducer,
                   candidates: Optional[torch.Tensor]) -> tuple[int, int]:
    """The first round: the candidates of all ranks, and the bit length of their largest
    position; NaN scores and positions out of range are refused on every rank alike."""
    header = [0] * _HEADER_SIZE
    if scores.numel():
        header[0] = count
        if bool(scores.sum().isnan()):  # a cheap pass first: NaN propagates through sums
            nan = torch.isnan(scores)
            header[1] = int(torch.count_nonzero(nan if candidates is None else nan & candidates))
        if callable(positions):
            header[_HEADER + position_bits] = 1
        elif count:
            checked = positions if candidates is None else compress(positions, candidates)
            smallest_position, largest_position = (int(v) for v in torch.aminmax(checked))
            header[2] = int(smallest_position < 0 or largest_position >= 1 << position_bits)
            header[_HEADER + min(max(largest_position, 0).bit_length(), MAX_POSITION_BITS)] = 1
    header = reduce_counts(torch.tensor(header, dtype=torch.int64,
                                        device=scores.device)).tolist()
    total, nans, ranks_out_of_range = header[:_HEADER]
    if nans:
        raise ValueError(f"select_extreme: {nans} NaN score(s) among the candidates")
    if ranks_out_of_range:
        raise ValueError(f"select_extreme: position(s) outside [0, 2**{position_bits}) on "
                         f"{ranks_out_of_range} rank(s)")
    bit_length = max(b for b in range(MAX_POSITION_BITS + 1) if header[_HEADER + b]) \
        if any(header[_HEADER:]) else 0
    return total, bit_length


def _break_ties(keys: torch.Tensor, threshold: int, largest: bool, needed: int, tied: int,
                positions_of: PositionsOf, position_bit_length: int,
                reduce_counts: CountReducer, candidates: Optional[torch.Tensor]) -> torch.Tensor:
    """Everything strictly better than the threshold key, and of the `tied` candidates at it
    (all ranks together) the `needed` of smallest position."""
    chosen = keys > threshold if largest else keys < threshold
    tied_mask = keys == threshold
    if candidates is not None:
        chosen.logical_and_(candidates)
        tied_mask.logical_and_(candidates)
    tied_index = flat_nonzero(tied_mask)
    tied_positions = positions_of(tied_index).to(torch.int64)
    shift, prefix, needed, tied = _radix_select(tied_positions, tied, needed,
                                                position_bit_length or 1, False, False,
                                                reduce_counts)
    if needed != tied:
        raise ValueError(f"select_extreme: {tied} candidates share a position and a score at "
                         "the threshold; positions must be unique across ranks")
    _, high = _bin_bounds(shift, prefix, 0)
    chosen[tied_index[tied_positions <= high]] = True
    return chosen
