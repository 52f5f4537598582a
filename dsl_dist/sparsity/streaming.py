"""Exact top-k over more candidates than a copy of them would fit, a chunk at a time.

`select_streaming` chooses what `select_extreme` (selection.py) chooses — the k best scores
over all ranks, ties at the threshold going to the candidates of smaller tie key — without ever
holding more than one chunk of keys. Each radix round is one pass over the chunks, whose
histograms are all-reduced as before, and the result is a rule (`Selection`) that tells any
chunk which of its candidates are chosen, instead of a mask of every entry. A selection costs
two passes over the scores (16 bits of the key each), plus, when equal scores straddle the
k-th place, one pass that collects the tied candidates' tie keys (or, when they are too many to
hold, up to four passes over them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol

import torch

from dsl_dist.sparsity.fastops import compress, flat_nonzero
from dsl_dist.sparsity.selection import (BINS, DIGIT_BITS, SCORE_BITS, CountReducer,
                                         _order_keys, _radix_select, local_counts, narrow)

TIES_HELD = 1 << 21
"""Tied candidates (over all ranks) whose tie keys one pass collects instead of streaming."""


@dataclass
class Chunk:
    """Consecutive entries of a rank's candidates, from flat index `offset`."""

    offset: int
    scores: torch.Tensor
    """float32 (n,); a narrower float is widened exactly."""
    candidates: Optional[torch.Tensor]
    """bool (n,): which entries take part (None: all)."""


class Candidates(Protocol):
    """One rank's candidates of a selection, visited a chunk at a time (every visit yields the
    same chunks in the same order)."""

    def chunks(self) -> Iterator[Chunk]: ...

    def tie_keys(self, flat: torch.Tensor) -> torch.Tensor:
        """int64 tie keys (unique across ranks, below 2**position_bits) of the entries at
        ascending flat indices `flat`."""
        ...


def unsigned_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) in the order of the scores (-0.0 and +0.0 alike)."""
    return _order_keys(scores.float()).to(torch.int64) + (1 << (SCORE_BITS - 1))


@dataclass(frozen=True)
class Selection:
    """The chosen candidates: every candidate whose key is beyond `key` (above it if `largest`,
    below it otherwise), those at `key` itself if `tie_key` is None, else those at `key` whose
    tie key is at most `tie_key`. `none` / `every` for k == 0 / k == all candidates."""

    largest: bool
    key: int = 0
    tie_key: Optional[int] = None
    none: bool = False
    every: bool = False

    def chosen(self, chunk: Chunk, tie_keys: Callable[[torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
        """Which entries of `chunk` are chosen (False outside its candidates)."""
        if self.none or self.every:
            full = torch.full(chunk.scores.shape, self.every, dtype=torch.bool,
                              device=chunk.scores.device)
            return full if chunk.candidates is None or self.none else chunk.candidates.clone()
        keys = unsigned_keys(chunk.scores)
        chosen = keys > self.key if self.largest else keys < self.key
        at = keys == self.key
        if chunk.candidates is not None:
            chosen &= chunk.candidates
            at &= chunk.candidates
        if self.tie_key is None:
            return chosen | at
        tied = flat_nonzero(at)
        if len(tied):
            keep = tie_keys(tied + chunk.offset) <= self.tie_key
            chosen[compress(tied, keep)] = True
        return chosen


def select_streaming(source: Candidates, k: int, *, largest: bool, reduce_counts: CountReducer,
                     position_bits: int) -> Selection:
    """The k largest (or smallest) candidates of all ranks, as `select_extreme` would choose
    them given the same scores and tie keys. Collective: every rank calls it with the same k,
    largest and position_bits. NaN scores among the candidates are refused on every rank."""
    if k < 0:
        raise ValueError(f"select_streaming: k={k} is negative")
    shift, prefix, total = SCORE_BITS - DIGIT_BITS, 0, None
    while True:
        histogram, count, nans = _score_histogram(source, shift, prefix, total is None)
        reduced = reduce_counts(torch.cat([histogram, torch.tensor([count, nans],
                                                                   device=histogram.device)]))
        histogram = reduced[:BINS]
        if total is None:
            total, nans = int(reduced[BINS]), int(reduced[BINS + 1])
            if nans:
                raise ValueError(f"select_streaming: {nans} NaN score(s) among the candidates")
            if k > total:
                raise ValueError(f"select_streaming: k={k} exceeds the {total} candidate(s) "
                                 "of all ranks")
            if k == 0 or k == total:
                return Selection(largest, none=k == 0, every=k == total)
        prefix, k, tied = narrow(histogram, k, largest, prefix, local_counts)
        if k == tied:  # every candidate of the bin is in: up to its far edge
            low, high = prefix << shift, ((prefix + 1) << shift) - 1
            return Selection(largest, low if largest else high)
        if shift == 0:
            break
        shift -= DIGIT_BITS
    return Selection(largest, prefix, _tie_threshold(source, prefix, tied, k, reduce_counts,
                                                     position_bits))


def _score_histogram(source: Candidates, shift: int, prefix: int, first: bool
                     ) -> tuple[torch.Tensor, int, int]:
    """Counts of the candidates' key digits at `shift` among those whose higher digits are
    `prefix` (all, in the first round), and (first round only) the candidates and NaNs; the
    histogram on the chunks' device."""
    histogram = torch.zeros(BINS, dtype=torch.int64)
    count = nans = 0
    for chunk in source.chunks():
        keys = unsigned_keys(chunk.scores)
        keep = chunk.candidates
        if first:
            count += chunk.scores.numel() if keep is None else int(torch.count_nonzero(keep))
            if bool(chunk.scores.float().sum().isnan()):
                nan = torch.isnan(chunk.scores)
                nans += int(torch.count_nonzero(nan if keep is None else nan & keep))
        else:
            at_prefix = (keys >> (shift + DIGIT_BITS)) == prefix
            keep = at_prefix if keep is None else keep & at_prefix
        digits = (keys >> shift) & (BINS - 1)
        if keep is not None:
            digits = compress(digits, keep)
        histogram = histogram.to(digits.device) + torch.bincount(digits, minlength=BINS)
    return histogram, count, nans


def _tie_threshold(source: Candidates, key: int, tied: int, needed: int,
                   reduce_counts: CountReducer, position_bits: int) -> int:
    """The largest tie key to take among the `tied` candidates at `key` (all ranks) so that
    `needed` of them, those of smallest tie key, are chosen."""
    def tied_keys(prefix_shift: int = 0, prefix: int = -1) -> Iterator[torch.Tensor]:
        for chunk in source.chunks():
            at = unsigned_keys(chunk.scores) == key
            if chunk.candidates is not None:
                at &= chunk.candidates
            index = flat_nonzero(at)
            if len(index):
                keys = source.tie_keys(index + chunk.offset)
                yield keys if prefix < 0 else compress(keys, (keys >> prefix_shift) == prefix)

    if tied <= TIES_HELD:
        parts = list(tied_keys())
        held = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        shift, prefix, needed, tied = _radix_select(held, tied, needed, max(position_bits, 1),
                                                    False, False, reduce_counts)
    else:
        shift = max(position_bits - 1, 0) // DIGIT_BITS * DIGIT_BITS
        prefix = 0
        while True:
            histogram = torch.zeros(BINS, dtype=torch.int64)
            for keys in tied_keys(shift + DIGIT_BITS, prefix if shift + DIGIT_BITS
                                  < max(position_bits, 1) else -1):
                histogram = (histogram.to(keys.device)
                             + torch.bincount((keys >> shift) & (BINS - 1), minlength=BINS))
            prefix, needed, tied = narrow(histogram, needed, False, prefix, reduce_counts)
            if needed == tied or shift == 0:
                break
            shift -= DIGIT_BITS
    if needed != tied:
        raise ValueError(f"select_streaming: {tied} candidates share a tie key and a score at "
                         "the threshold; tie keys must be unique across ranks")
    return ((prefix + 1) << shift) - 1
