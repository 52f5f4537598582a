"""Primitives that torch runs slowly on one CPU thread, with a NumPy path on CPU.

Training processes run one thread each, and there torch's boolean indexing, nonzero and
row-wise any() take 3-8x the time of NumPy's on the same memory (2.6M elements: nonzero 6 ms
vs 0.7 ms). Drop-and-grow makes a few such passes over every shard per update, so they decide
its cost. NumPy shares the tensors' memory (no copy); other devices use torch.

Every branch chosen by device asks `host_path`, and `DSL_DEVICE_PATH=torch` (or the
`device_path()` context) sends CPU tensors down the torch branch, the one a GPU runs, so
that CI on CPU runs the GPU's code too.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from dsl_dist.sparsity.selection import chunk_kernels

_forced_device_path = os.environ.get("DSL_DEVICE_PATH", "") == "torch"


def host_path(tensor: torch.Tensor) -> bool:
    """Whether `tensor` takes the NumPy/numba branch: on CPU, unless the device (torch) path
    is forced."""
    return tensor.device.type == "cpu" and not _forced_device_path


@contextmanager
def device_path() -> Iterator[None]:
    """Within it, CPU tensors take the torch branch a GPU takes (for tests on CPU)."""
    global _forced_device_path
    previous, _forced_device_path = _forced_device_path, True
    try:
        yield
    finally:
        _forced_device_path = previous


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """int64 indices of the True entries of a bool tensor, in its flattened (row-major) order."""
    if host_path(mask):
        return torch.from_numpy(mask.contiguous().numpy().reshape(-1).nonzero()[0])
    return torch.nonzero(mask.reshape(-1)).view(-1)


def compress(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """values[keep] for a 1-D tensor and a bool tensor of the same length."""
    if host_path(values):
        return torch.from_numpy(values.contiguous().numpy()[keep.numpy()])
    return values[keep]


def multiply_rows_(weight: torch.Tensor, rows: torch.Tensor, factors: torch.Tensor) -> None:
    """weight[rows[i]] *= factors[i] in place, for a 2-D weight and (len(rows), cols) factors
    (repeated rows allowed when their factors agree: each copy writes the same product).
    NumPy's take and fancy assignment are ~1.5x faster here than torch's
    index_select/index_copy_, and this runs after every step."""
    if host_path(weight):
        w, r = weight.detach().numpy(), rows.numpy()
        block = np.take(w, r, axis=0)
        block *= factors.numpy()
        w[r] = block
        return
    weight.index_copy_(0, rows, weight.index_select(0, rows).mul_(factors))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 2-D bool tensor as uint8 (rows, ceil(cols / 8)), 8 columns a byte, first column in
    the high bit (NumPy's packbits)."""
    if host_path(mask):
        return torch.from_numpy(np.packbits(mask.contiguous().numpy(), axis=1))
    padded = torch.nn.functional.pad(mask, (0, -mask.shape[1] % 8)).view(mask.shape[0], -1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (padded.to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The bool (rows, cols) tensor `pack_bits` packed."""
    if host_path(packed):
        return torch.from_numpy(np.unpackbits(packed.contiguous().numpy(), axis=1,
                                              count=cols).view(np.bool_))
    # a byte's 8 bits by table look-up: 3 ops a call (this runs after every step)
    bits = _bit_table(packed.device)[packed.long()].view(packed.shape[0], -1)
    if cols != bits.shape[1]:  # contiguous like NumPy's result, so that callers may .view() it
        bits = bits[:, :cols].contiguous()
    return bits.view(torch.bool)


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _bit_table(device: torch.device) -> torch.Tensor:
    """uint8 (256, 8): the bits of every byte value, high bit first."""
    if device not in _BIT_TABLES:
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
        table = (torch.arange(256, dtype=torch.uint8)[:, None] >> shifts) & 1
        _BIT_TABLES[device] = table.to(device)
    return _BIT_TABLES[device]


POPCOUNT_BYTES = 1 << 18
"""Bytes of a packed mask that the torch path of `popcount` counts at once: its temporaries
are a few times that, whatever the mask's size."""


def popcount(packed: torch.Tensor) -> int:
    """The set bits of a packed mask."""
    if host_path(packed):
        return int(np.bitwise_count(packed.numpy()).sum(dtype=np.int64))
    total = torch.zeros((), dtype=torch.int64, device=packed.device)
    for piece in packed.reshape(-1).split(POPCOUNT_BYTES):
        piece = torch.nn.functional.pad(piece, (0, -len(piece) % 16))  # zeros count nothing
        piece = piece - ((piece >> 1) & 0x55)  # each byte's bit count, in the byte (SWAR)
        piece = (piece & 0x33) + ((piece >> 2) & 0x33)
        piece = (piece + (piece >> 4)) & 0x0F
        # 16 bytes of at most 8 fit a byte; only then widen (a sum to int64 copies first)
        total += piece.view(-1, 16).sum(1, dtype=torch.uint8).sum(dtype=torch.int64)
    return int(total)


def zero_where_(values: torch.Tensor, packed: torch.Tensor) -> None:
    """Zeroes the entries of a 2-D tensor whose bit is set in `packed` (its pack_bits
    mask), in place; on CPU without unpacking the mask."""
    if host_path(values):
        integers = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
        chunk_kernels.zero_where(values.detach().view(integers).numpy(), packed.numpy())
        return
    values.mul_((~unpack_bits(packed, values.shape[1])).view(torch.uint8))


def concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without copying a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
