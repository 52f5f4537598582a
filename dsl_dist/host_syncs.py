"""Counting, on any device, the ops a training step dispatches and those that would make a CUDA
host wait for the GPU.

A GPU step is fast only while the host queues kernels ahead of the device; an op whose result
the host must read (a scalar, or a size that depends on the data) stops the queue until the
GPU catches up. On CPU nothing waits, so such ops go unnoticed there: `HostSyncCounter` names
them wherever they run, so that a CPU test can keep them out of the step (run it on the forced
device path, fastops.device_path, so that CPU tensors take the branches a GPU takes).

It sees every aten op dispatched in its thread (`ops`), and counts as a sync:
- reading a value on the host: `.item()`, `bool()`, `int()`, `float()` of a tensor
  (aten._local_scalar_dense), `.tolist()`, `.numpy()`, `.cpu()`;
- ops whose output size depends on the data: nonzero, masked_select, boolean-mask indexing
  and assignment, unique, bincount, repeat_interleave without `output_size`, and FBGEMM's
  permutes without their output size.
Each sync is recorded with where it came from (see `Sync`).
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_PACKAGE = "dsl_dist"
_TORCH_DIR = str(Path(torch.__file__).parent) + "/"
_THIS_FILE = __file__

_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "bincount", "_unique", "_unique2",
                   "unique_dim", "unique_consecutive", "unique_dim_consecutive", "equal",
                   "_local_scalar_dense", "is_nonzero"}
"""aten ops (by name, any overload) that always read the device on the host."""
_SIZED_BY = {"repeat_interleave": "output_size", "permute_2D_sparse_data": "permuted_lengths_sum",
             "permute_1D_sparse_data": "permuted_lengths_sum"}
"""Ops that read the device only when the named argument (their output size) is missing."""
_MASK_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}
"""Ops that read the device when an index is a boolean mask."""
_HOST_READS = {"tolist", "numpy", "cpu"}
"""Tensor methods that copy to the host (invisible to dispatch on CPU)."""


@dataclass(frozen=True)
class Sync:
    """One kind of sync: the op, the innermost frame outside torch that ran it (`where`,
    e.g. `dsl_dist/data/graph.py:gather` or `torchrec/sparse/jagged_tensor.py:...`), and the
    innermost frame of this package on the way there (`caller`: where our code handed control
    to a library, or `where` itself)."""

    op: str
    where: str
    caller: str

    @property
    def ours(self) -> bool:
        """Whether our own code, not a library it called, asked for the sync."""
        return self.where.startswith(_PACKAGE + "/")


def _frame_name(filename: str, function: str) -> str:
    parts = Path(filename).parts
    for anchor in (_PACKAGE, "torchrec", "fbgemm_gpu", "torch", "tests", "benchmarks"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[index:]) + f":{function}"
    return f"{Path(filename).name}:{function}"


def _origin() -> tuple[str, str]:
    """(where, caller) of the op being dispatched now (see Sync)."""
    where = caller = None
    for frame in reversed(traceback.extract_stack()):
        if frame.filename == _THIS_FILE:
            continue
        inside_torch = frame.filename.startswith(_TORCH_DIR)
        if where is None and not inside_torch:
            where = _frame_name(frame.filename, frame.name)
        if f"/{_PACKAGE}/" in frame.filename:
            caller = _frame_name(frame.filename, frame.name)
            break
    return where or "?", caller or "?"


def _argument(func: Any, args: tuple, kwargs: dict, name: str) -> Any:
    """The value an op was given for its argument `name` (None if not given)."""
    if name in kwargs:
        return kwargs[name]
    names = [a.name for a in func._schema.arguments]
    position = names.index(name) if name in names else len(args)
    return args[position] if position < len(args) else None


def _is_sync(func: Any, name: str, args: tuple, kwargs: dict) -> bool:
    if name in _DATA_DEPENDENT:
        return True
    if name in _SIZED_BY:
        return _argument(func, args, kwargs, _SIZED_BY[name]) is None
    if name in _MASK_INDEXED:
        indices = _argument(func, args, kwargs, "indices") or ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices)
    return False


class _HostReads(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.counter.record(name)
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as counter:` counts the ops dispatched in this thread
    (`counter.ops`) and the syncs among them (`counter.syncs`, by Sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs: Counter[Sync] = Counter()
        self._host_reads = _HostReads(self)

    def __enter__(self) -> HostSyncCounter:
        self._host_reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._host_reads.__exit__(*exc)

    def record(self, op: str) -> None:
        self.syncs[Sync(op, *_origin())] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        name = func._schema.name.split("::")[-1]
        if _is_sync(func, name, args, kwargs):
            self.record(name)
        return func(*args, **kwargs)

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def summary(self) -> dict[str, int]:
        """`op at where (via caller)`: count, for reports."""
        return {f"{s.op} at {s.where}" + (f" (via {s.caller})" if s.caller != s.where else ""): n
                for s, n in self.syncs.most_common()}

