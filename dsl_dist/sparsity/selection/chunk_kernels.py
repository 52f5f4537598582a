"""One pass of a drop-and-grow over a chunk of a shard, compiled for the CPU (numba).

Every pass of an update reads every weight (or growth statistic) of a rank once. In torch each
pass costs several temporaries per weight (the absolute value, the unpacked mask, an int64 key,
its digits, a filter) and a run over memory for each; these loops read the scores and the packed
candidate bits (fastops.pack_bits: a bit a weight, first column in the high bit) in place and
keep nothing per weight, so a pass costs about one read of the scores.

Scores arrive as their bit patterns: float32 as uint32, bfloat16 as uint16 (`widen` = 16
shifts it into a float32's bits, which is exact). Keys are the radix-sort keys of
exact.py's `_order_keys` plus 2**31 (see streaming.py's `signed_keys`): the sign bit flipped
for non-negative floats, all bits flipped for negative ones, -0.0 keyed as +0.0; `absolute`
clears the sign first (the score is |x|). streaming.py calls these on CPU tensors and does
the same in torch elsewhere; tests/test_streaming.py checks that both choose alike.
"""

from __future__ import annotations

import numba
import numpy as np

_SIGN = np.uint32(0x80000000)
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_INFINITY = np.uint32(0x7F800000)
_DIGIT = np.uint32(0xFFFF)
_SCRAMBLE = np.uint64(0x9E3779B97F4A7C15)  # hashing.POSITION_SCRAMBLE as unsigned
_kernel = numba.njit(cache=True, nogil=True)


@numba.njit(cache=True, inline="always")
def _bits_of(value: np.uint32, widen: int, absolute: bool) -> np.uint32:
    bits = np.uint32(np.uint32(value) << np.uint32(widen))
    return np.uint32(bits & _MAGNITUDE) if absolute else bits


@numba.njit(cache=True, inline="always")
def _key(bits: np.uint32) -> np.uint32:
    if bits == _SIGN:  # -0.0
        return _SIGN
    return np.uint32(~bits) if bits & _SIGN else np.uint32(bits | _SIGN)


@numba.njit(cache=True, inline="always")
def _key_at(scores: np.ndarray, row: int, col: int, widen: int, absolute: bool) -> np.uint32:
    return _key(_bits_of(scores[row, col], widen, absolute))


@numba.njit(cache=True, inline="always")
def _bit(bit: int) -> np.uint8:
    return np.uint8(128 >> bit)


@numba.njit(cache=True, inline="always")
def _candidate_byte(candidates: np.ndarray, every: bool, row: int, byte: int, cols: int
                    ) -> tuple[np.uint8, int, int]:
    """The candidate bits of a row's `byte`-th eight entries (all set if `every`), the first
    column they cover and how many columns (fewer at the row's end)."""
    first_col = byte * 8
    return (np.uint8(0xFF) if every else candidates[row, byte], first_col,
            min(8, cols - first_col))


@_kernel
def histogram(scores: np.ndarray, widen: int, absolute: bool, candidates: np.ndarray,
              every: bool, shift: int, prefix: int, first: bool,
              out: np.ndarray) -> tuple[int, int]:
    """Adds to `out` (65536 int64) the counts of the candidates' key digits at `shift`, of
    those whose higher bits are `prefix` (all of them when `first`). Returns the candidates
    and their NaN scores (first round only, else zeros).

    The loops avoid branching on the candidate bits, which are as random as the mask: the
    first round adds each bit (0 or 1) to its digit's count; later rounds compare a byte's
    eight keys with the prefix first and visit the byte only when one matches (rarely)."""
    count = nans = 0
    rows, cols = scores.shape
    for row in range(rows):
        for byte in range((cols + 7) // 8):
            bits8, first_col, width = _candidate_byte(candidates, every, row, byte, cols)
            if bits8 == 0:
                continue
            if first:
                for bit in range(width):
                    take = np.int64((bits8 >> (7 - bit)) & 1)
                    value = _bits_of(scores[row, first_col + bit], widen, absolute)
                    count += take
                    nans += take & ((value & _MAGNITUDE) > _INFINITY)
                    out[(_key(value) >> np.uint32(shift)) & _DIGIT] += take
                continue
            matches = np.uint8(0)
            for bit in range(width):
                key = _key_at(scores, row, first_col + bit, widen, absolute)
                matches |= _bit(bit) * np.uint8((key >> np.uint32(shift + 16)) == prefix)
            matches &= bits8
            if matches:
                for bit in range(width):
                    if matches & _bit(bit):
                        key = _key_at(scores, row, first_col + bit, widen, absolute)
                        out[(key >> np.uint32(shift)) & _DIGIT] += 1
    return count, nans


@numba.njit(cache=True, inline="always")
def _tie_key(first: int, stride: int, row: int, col: int, key_mask: np.uint64) -> np.uint64:
    """The tie key of the entry at (row, col), at global position first + row * stride + col
    (ShardCandidates.tie_keys: position * POSITION_SCRAMBLE, its low position_bits bits)."""
    return np.uint64(np.uint64(first + row * stride + col) * _SCRAMBLE) & key_mask


@_kernel
def choose(scores: np.ndarray, widen: int, absolute: bool, candidates: np.ndarray,
           every: bool, key: int, largest: bool, take_ties: bool, chosen: np.ndarray,
           tied: np.ndarray, tie_key: int, first: int, stride: int, key_bits: int) -> int:
    """Writes into `chosen` (packed like the candidates) the candidates whose key is beyond
    `key` (above it if `largest`), and of those at `key`: all if `take_ties`; else, given a
    `tie_key` >= 0, those whose tie key is at most `tie_key` (the entry at (row, col) is at
    global position first + row * stride + col, its tie key `key_bits` wide); else none, and
    their flat (row-major) indices go into `tied` (room for every entry): returns how many.
    A byte's eight comparisons are made before its candidate bits are applied, and its ties
    visited only when it has some."""
    count = 0
    rows, cols = scores.shape
    threshold = np.uint32(key)
    key_mask = np.uint64((1 << key_bits) - 1)
    for row in range(rows):
        for byte in range((cols + 7) // 8):
            bits8, first_col, width = _candidate_byte(candidates, every, row, byte, cols)
            beyond = at = np.uint8(0)
            for bit in range(width):
                k = _key_at(scores, row, first_col + bit, widen, absolute)
                beyond |= _bit(bit) * np.uint8(k > threshold if largest else k < threshold)
                at |= _bit(bit) * np.uint8(k == threshold)
            beyond &= bits8
            at &= bits8
            if at and take_ties:
                beyond |= at
            elif at:
                for bit in range(width):
                    if not at & _bit(bit):
                        continue
                    if tie_key >= 0:
                        if _tie_key(first, stride, row, first_col + bit,
                                    key_mask) <= np.uint64(tie_key):
                            beyond |= _bit(bit)
                    else:
                        tied[count] = row * cols + first_col + bit
                        count += 1
            chosen[row, byte] = beyond
    return count


@_kernel
def tie_histogram(scores: np.ndarray, widen: int, absolute: bool, candidates: np.ndarray,
                  every: bool, key: int, first: int, stride: int, key_bits: int, shift: int,
                  prefix: int, out: np.ndarray) -> None:
    """Adds to `out` (65536 int64) the counts of the tie-key digits at `shift` of the
    candidates whose key is `key` and whose tie key's bits above shift + 16 are `prefix`
    (-1: any); positions and tie keys as in `choose`."""
    rows, cols = scores.shape
    threshold = np.uint32(key)
    key_mask = np.uint64((1 << key_bits) - 1)
    for row in range(rows):
        for byte in range((cols + 7) // 8):
            bits8, first_col, width = _candidate_byte(candidates, every, row, byte, cols)
            if bits8 == 0:
                continue
            at = np.uint8(0)
            for bit in range(width):
                at |= _bit(bit) * np.uint8(_key_at(scores, row, first_col + bit, widen,
                                                   absolute) == threshold)
            at &= bits8
            for bit in range(width if at else 0):
                if at & _bit(bit):
                    t = _tie_key(first, stride, row, first_col + bit, key_mask)
                    if prefix < 0 or (t >> np.uint64(shift + 16)) == np.uint64(prefix):
                        out[(t >> np.uint64(shift)) & np.uint64(0xFFFF)] += 1


@_kernel
def set_flat(packed: np.ndarray, cols: int, flat: np.ndarray) -> None:
    """Sets the bits of the entries at flat indices `flat` of a packed (rows, cols) mask."""
    for index in flat:
        row, col = divmod(index, cols)
        packed[row, col >> 3] |= np.uint8(128 >> (col & 7))


@_kernel
def count_and_digest(packed: np.ndarray, cols: int, base: int, table_cols: int
                     ) -> tuple[int, int]:
    """The set bits of a packed (rows, cols) mask whose (row, col) is at global position
    base + row * table_cols + col, and the sum of their positions' 32-bit hashes (the top
    half of position * POSITION_SCRAMBLE, as dsl.py's mask digest)."""
    count = digest = 0
    for row in range(packed.shape[0]):
        start = np.uint64(base + row * table_cols)
        for byte in range(packed.shape[1]):
            bits8 = packed[row, byte]
            if bits8 == 0:
                continue
            for bit in range(8):
                take = np.uint64((bits8 >> (7 - bit)) & 1)
                position = start + np.uint64(byte * 8 + bit)
                count += take
                digest += np.int64(take * ((position * _SCRAMBLE) >> np.uint64(32)))
    return count, digest


@_kernel
def zero_where(values: np.ndarray, packed: np.ndarray) -> None:
    """Zeroes (as bit patterns: +0.0 for any float) the entries of a (rows, cols) array whose
    bit is set in `packed`."""
    rows, cols = values.shape
    for row in range(rows):
        for byte in range(packed.shape[1]):
            value = packed[row, byte]
            if value == 0:
                continue
            for bit in range(min(8, cols - byte * 8)):
                if (value >> (7 - bit)) & 1:
                    values[row, byte * 8 + bit] = 0
