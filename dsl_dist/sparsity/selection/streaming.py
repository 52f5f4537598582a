"""Exact top-k over more candidates than a copy of them would fit, a chunk at a time.

`select_streaming` chooses what `select_extreme` (exact.py) chooses — the k best scores
over all ranks, ties at the threshold going to the candidates of smaller tie key — without ever
holding more than one chunk of keys. Each radix round is one pass over the chunks, whose
histograms are all-reduced as before, and the result is a rule (`Selection`) that tells any
chunk which of its candidates are chosen, instead of a mask of every entry. A selection costs
two passes over the scores (16 bits of the key each; one for bfloat16 scores, whose low 16
bits are zero), plus, when equal scores straddle the k-th place, one pass that collects the
tied candidates' tie keys (or, when they are too many to hold, up to four passes over them).
That pass keeps what it finds, the chunks' choices as packed bits (a bit an entry), so that
reading the choice afterwards costs no further pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol

import numpy as np
import torch

from dsl_dist.sparsity.selection import chunk_kernels
from dsl_dist.sparsity.selection.exact import (BINS, DIGIT_BITS, SCORE_BITS, CountReducer,
                                         _order_keys, _radix_select, local_counts, narrow)
from dsl_dist.sparsity.selection.fastops import (compress, concat, flat_nonzero, host_path,
                                                 pack_bits, unpack_bits)

TIE_MEMORY = 32 << 20
"""Bytes of tied candidates (over all ranks) that one pass holds instead of streaming over
them, by default."""


@dataclass
class Chunk:
    """Consecutive rows of a rank's candidates, the first entry at flat index `offset`."""

    offset: int
    scores: torch.Tensor
    """(rows, cols), float32 or bfloat16 (a float16 is widened exactly)."""
    candidates: Optional[torch.Tensor]
    """uint8 (rows, ceil(cols / 8)): which entries take part, a bit each (fastops.pack_bits);
    None: all."""
    absolute: bool = False
    """Whether an entry's score is the absolute value of `scores` (a weight's magnitude, read
    from the weight itself)."""
    positions: Optional[tuple[int, int]] = None
    """(first, stride): the entry at (row, col) is at global position first + row * stride +
    col, and its tie key is the low position_bits bits of position * POSITION_SCRAMBLE (what
    the source's tie_keys gives), so the compiled passes compute tie keys in place; None:
    only tie_keys knows them."""


FUSED = True
"""Run the passes over CPU chunks as the compiled loops of chunk_kernels.py (torch's ops
otherwise, as on other devices); tests switch it off to compare the two."""


class Candidates(Protocol):
    """One rank's candidates of a selection, visited a chunk at a time (every visit yields the
    same chunks in the same order)."""

    def chunks(self) -> Iterator[Chunk]: ...

    def tie_keys(self, flat: torch.Tensor) -> torch.Tensor:
        """int64 tie keys (unique across ranks, below 2**position_bits) of the entries at
        ascending flat indices `flat`."""
        ...


_TOP_BIT = 1 << (SCORE_BITS - 1)


def signed_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys in the order of the scores (-0.0 and +0.0 alike; exact.py's `_order_keys`,
    possibly a view of the scores): a score's key in the radix rounds and chunk_kernels, in
    [0, 2**32), is its signed key + 2**31. Half the bytes of int64 keys on the torch path."""
    return _order_keys(scores.float())


def _key_digits(keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Bits [shift, shift + 16) of the unsigned keys of signed `keys`: the same bits of the
    signed ones, the top bit flipped in the top digit."""
    digits = (keys >> shift).bitwise_and_(BINS - 1)
    return digits.bitwise_xor_(BINS >> 1) if shift + DIGIT_BITS == SCORE_BITS else digits


def _fused(chunk: Chunk) -> bool:
    return FUSED and host_path(chunk.scores)


def _kernel_arguments(chunk: Chunk) -> tuple[np.ndarray, int, bool, np.ndarray, bool]:
    """(score bits, widen, absolute, packed candidates, every) for chunk_kernels."""
    scores = chunk.scores
    if scores.dtype == torch.bfloat16:
        bits, widen = scores.view(torch.int16).numpy().view(np.uint16), 16
    else:
        bits, widen = scores.float().view(torch.int32).numpy().view(np.uint32), 0
    every = chunk.candidates is None
    candidates = _NO_CANDIDATES if every else chunk.candidates.numpy()
    return bits, widen, chunk.absolute, candidates, every


_NO_CANDIDATES = np.zeros((1, 1), dtype=np.uint8)
_NO_TIES = np.zeros(0, dtype=np.int64)


def _flat(chunk: Chunk) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The chunk's float32 scores and bool candidates (or None), flattened: torch's view."""
    scores = chunk.scores.float()
    scores = scores.abs() if chunk.absolute else scores
    candidates = (None if chunk.candidates is None
                  else unpack_bits(chunk.candidates, chunk.scores.shape[1]).reshape(-1))
    return scores.reshape(-1), candidates


def _packed_shape(chunk: Chunk) -> tuple[int, int]:
    rows, cols = chunk.scores.shape
    return rows, (cols + 7) // 8


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
    tie_bits: int = 0
    """The tie keys' width (position_bits), for chunks that compute them in place."""
    held: dict[int, torch.Tensor] = field(default_factory=dict, compare=False)
    """The choices already made by the pass that broke the ties, by chunk offset: valid for
    the chunks of the source the selection was made over, and handed over once (`chosen`
    forgets each as it returns it, so that they and the caller's copy are not both held)."""

    def chosen(self, chunk: Chunk, tie_keys: Callable[[torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
        """Which entries of `chunk` are chosen, packed like its candidates (no bit outside
        them)."""
        if chunk.offset in self.held:
            return self.held.pop(chunk.offset)
        shape, device = _packed_shape(chunk), chunk.scores.device
        if self.none or self.every:
            if self.every and chunk.candidates is not None:
                return chunk.candidates.clone()
            every = torch.ones(chunk.scores.shape, dtype=torch.bool, device=device)
            return pack_bits(every) if self.every else torch.zeros(shape, dtype=torch.uint8,
                                                                    device=device)
        if self.tie_key is not None and _fused(chunk) and chunk.positions is not None:
            packed = np.empty(shape, dtype=np.uint8)
            chunk_kernels.choose(*_kernel_arguments(chunk), self.key, self.largest, False,
                                 packed, _NO_TIES, self.tie_key, *chunk.positions,
                                 self.tie_bits)
            return torch.from_numpy(packed)
        packed, tied = _split(chunk, self.key, self.largest, self.tie_key is None)
        if len(tied):
            _set_flat(packed, chunk.scores.shape[1],
                      compress(tied, tie_keys(tied + chunk.offset) <= self.tie_key))
        return packed


def _split(chunk: Chunk, key: int, largest: bool, take_ties: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's candidates whose key is beyond `key` (above it if `largest`), with those at
    `key` if `take_ties`, packed; and the flat indices of those at `key` otherwise (else
    none)."""
    if _fused(chunk):
        packed = np.empty(_packed_shape(chunk), dtype=np.uint8)
        tied = np.empty(0 if take_ties else chunk.scores.numel(), dtype=np.int64)
        count = chunk_kernels.choose(*_kernel_arguments(chunk), key, largest, take_ties,
                                     packed, tied, -1, 0, 0, 0)
        return torch.from_numpy(packed), torch.from_numpy(tied[:count])
    scores, candidates = _flat(chunk)
    keys, signed_key = signed_keys(scores), key - _TOP_BIT
    chosen = keys > signed_key if largest else keys < signed_key
    at = keys == signed_key
    if candidates is not None:
        chosen &= candidates
        at &= candidates
    if take_ties:
        chosen |= at
    tied = torch.zeros(0, dtype=torch.int64) if take_ties else flat_nonzero(at)
    return pack_bits(chosen.view(chunk.scores.shape)), tied


def _set_flat(packed: torch.Tensor, cols: int, flat: torch.Tensor) -> None:
    """Sets the bits of the entries at flat indices `flat` of a packed (rows, cols) mask."""
    if host_path(packed):
        chunk_kernels.set_flat(packed.numpy(), cols, flat.numpy())
        return
    mask = unpack_bits(packed, cols).view(-1)
    mask[flat] = True
    packed.copy_(pack_bits(mask.view(-1, cols)))


def select_streaming(source: Candidates, k: int, *, largest: bool, reduce_counts: CountReducer,
                     position_bits: int, score_bits: int = SCORE_BITS,
                     tie_memory: Optional[int] = None) -> Selection:
    """The k largest (or smallest) candidates of all ranks, as `select_extreme` would choose
    them given the same scores and tie keys. Collective: every rank calls it with the same
    arguments but its own source. `score_bits`: 16 when every score is a bfloat16 (its key's
    low 16 bits follow from the high ones, so the second round is skipped). `tie_memory`: the
    bytes the tied candidates may take to be held (TIE_MEMORY if None). NaN scores among the
    candidates are refused on every rank."""
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
        if shift <= SCORE_BITS - score_bits:
            break
        shift -= DIGIT_BITS
    key = prefix << shift
    if shift:  # bfloat16 scores: the bin holds one key, low bits 0 (>= 0) or flipped to 1 (< 0)
        key |= 0 if prefix >> (SCORE_BITS - shift - 1) else (1 << shift) - 1
    return _break_ties(source, key, largest, tied, k, reduce_counts, position_bits,
                       TIE_MEMORY if tie_memory is None else tie_memory)


def _score_histogram(source: Candidates, shift: int, prefix: int, first: bool
                     ) -> tuple[torch.Tensor, int, int]:
    """Counts of the candidates' key digits at `shift` among those whose higher digits are
    `prefix` (all, in the first round), and (first round only) the candidates and NaNs; the
    histogram on the chunks' device."""
    histogram = torch.zeros(BINS, dtype=torch.int64)
    count = nans = 0
    for chunk in source.chunks():
        if _fused(chunk):
            counted, nan = chunk_kernels.histogram(*_kernel_arguments(chunk), shift, prefix,
                                                   first, histogram.numpy())
            count, nans = count + counted, nans + nan
            continue
        scores, keep = _flat(chunk)
        keys = signed_keys(scores)
        if first:
            count += scores.numel() if keep is None else int(torch.count_nonzero(keep))
            if bool(scores.sum().isnan()):
                nan = torch.isnan(scores)
                nans += int(torch.count_nonzero(nan if keep is None else nan & keep))
        else:
            at_prefix = _key_digits(keys, shift + DIGIT_BITS) == prefix
            keep = at_prefix if keep is None else keep & at_prefix
        digits = _key_digits(keys, shift)
        if keep is not None:
            digits = compress(digits, keep)
        histogram = histogram.to(digits.device) + torch.bincount(digits, minlength=BINS)
    return histogram, count, nans


def _break_ties(source: Candidates, key: int, largest: bool, tied: int, needed: int,
                reduce_counts: CountReducer, position_bits: int, tie_memory: int) -> Selection:
    """The selection that takes, of the `tied` candidates at `key` (all ranks), the `needed`
    of smallest tie key. When the tied fit in `tie_memory` bytes (16 a candidate: its int32
    index in its chunk and tie key, their concatenation and the radix rounds' temporaries
    over them, while tie keys have at most 31 bits; else 32), their pass keeps them and every
    chunk's choice (`Selection.held`); otherwise it streams over their tie keys."""
    narrow_keys = position_bits <= 31
    if tied * (16 if narrow_keys else 32) <= tie_memory:
        parts = []  # per chunk: offset, columns, choice, tied (index, tie key); no scores
        for chunk in source.chunks():
            packed, index = _split(chunk, key, largest, False)
            keys = source.tie_keys(index + chunk.offset) if len(index) else index
            if narrow_keys:
                index, keys = index.to(torch.int32), keys.to(torch.int32)
            else:
                index = index.clone()  # not a view of the chunk-sized buffer _split filled
            parts.append((chunk.offset, chunk.scores.shape[1], packed, index, keys))
        held = concat([keys for *_, keys in parts] or [torch.empty(0, dtype=torch.int64)])
        shift, prefix, needed, tied = _radix_select(held, tied, needed, max(position_bits, 1),
                                                    False, False, reduce_counts)
        threshold = _tie_threshold(shift, prefix, needed, tied)
        for _, cols, packed, index, keys in parts:
            if len(index):
                _set_flat(packed, cols, compress(index, keys <= threshold))
        return Selection(largest, key, threshold,
                         held={offset: packed for offset, _, packed, *_ in parts})

    shift = max(position_bits - 1, 0) // DIGIT_BITS * DIGIT_BITS
    prefix = 0
    while True:
        histogram = _tie_histogram(source, key, largest, position_bits, shift, prefix if
                                   shift + DIGIT_BITS < max(position_bits, 1) else -1)
        prefix, needed, tied = narrow(histogram, needed, False, prefix, reduce_counts)
        if needed == tied or shift == 0:
            break
        shift -= DIGIT_BITS
    return Selection(largest, key, _tie_threshold(shift, prefix, needed, tied),
                     tie_bits=position_bits)


def _tie_histogram(source: Candidates, key: int, largest: bool, position_bits: int,
                   shift: int, prefix: int) -> torch.Tensor:
    """Counts of the tie-key digits at `shift` of the candidates at `key` whose tie key's
    higher digits are `prefix` (-1: any): one pass over the chunks."""
    histogram = torch.zeros(BINS, dtype=torch.int64)
    for chunk in source.chunks():
        if _fused(chunk) and chunk.positions is not None:
            chunk_kernels.tie_histogram(*_kernel_arguments(chunk), key, *chunk.positions,
                                        position_bits, shift, prefix, histogram.numpy())
            continue
        _, index = _split(chunk, key, largest, False)
        if len(index):
            keys = source.tie_keys(index + chunk.offset)
            if prefix >= 0:
                keys = compress(keys, (keys >> (shift + DIGIT_BITS)) == prefix)
            histogram = (histogram.to(keys.device)
                         + torch.bincount((keys >> shift) & (BINS - 1), minlength=BINS))
    return histogram


def _tie_threshold(shift: int, prefix: int, needed: int, tied: int) -> int:
    """The largest tie key to take, from the last radix round over the tied candidates."""
    if needed != tied:
        raise ValueError(f"select_streaming: {tied} candidates share a tie key and a score at "
                         "the threshold; tie keys must be unique across ranks")
    return ((prefix + 1) << shift) - 1
