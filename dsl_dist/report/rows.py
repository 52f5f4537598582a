"""What DSL kept: active weights per embedding row, read from a run's final checkpoint, and
each row's popularity (its interactions in the train split).

The checkpoint is read in this one process, without a process group: DCP's metadata gives
every tensor's global shape, and `dcp.load` of whole tensors of those shapes assembles them
from the shards however many ranks wrote them. Weight-level DSL keeps a mask per table
("sparsity.<table>.mask", rows × cols); block DSL a width in blocks per row
("sparsity.<table>.widths"), whose weights are width × block size.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp

from dsl_dist.checkpoint import complete_checkpoints
from dsl_dist.config.registry import SPARSITY_METHODS
from dsl_dist.data.manifest import Manifest
from dsl_dist.report.runs import Run
from dsl_dist.sparsity.record import UpdateRecord

SIDES = ("user", "item")
"""A table belongs to the side its name starts with (user, user_gmf, item_encoder, ...)."""


def final_checkpoint(run: Run) -> Optional[Path]:
    directory = run.config["checkpoint"]["dir"] or run.directory / "checkpoints"
    found = complete_checkpoints(Path(directory))
    return found[0] if found else None


def active_per_row(run: Run) -> dict[str, tuple[np.ndarray, int]]:
    """Per sparsified table, the active weights of every row at the end of the run and the
    row's width (nothing for a dense run or one without a checkpoint)."""
    path = final_checkpoint(run)
    layout = SPARSITY_METHODS[run.config["sparsity"]["name"]].export_layout
    if path is None or layout == "dense":
        return {}
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    wanted = {key: meta for key, meta in metadata.items() if key.startswith("sparsity.")
              and key.endswith(".mask" if layout == "mask" else ".widths")}
    state = {key: torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
             for key, meta in wanted.items()}
    if not state:
        return {}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: we mean to
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    counts = {}
    for key, tensor in state.items():
        table = key[len("sparsity."):].rsplit(".", 1)[0]
        if layout == "mask":
            counts[table] = (tensor.sum(dim=1).numpy(), tensor.shape[1])
        else:
            counts[table] = _block_weights(run, table, tensor.to(torch.int64))
    return counts


def _block_weights(run: Run, table: str, widths: torch.Tensor) -> tuple[np.ndarray, int]:
    """A block layout's active weights per row and the row width, which it does not keep: the
    last update's record gives the block size and the table's density, so its weights are
    active / density over its rows (the layout has not changed since that update)."""
    update = UpdateRecord.from_dict(run.of("update")[-1])
    active = widths * update.blocks["size"]
    width = round(int(active.sum()) / update.density[table] / len(widths))
    return active.numpy(), width


def popularity(run: Run) -> dict[str, np.ndarray]:
    """Interactions of every user and every item in the prepared train split."""
    dataset = Path(run.config["data"]["path"])
    manifest = Manifest.load(dataset)
    sizes = {"user": manifest.num_users, "item": manifest.num_items}
    totals = {side: np.zeros(size, dtype=np.int64) for side, size in sizes.items()}
    for shard in manifest.split("train").shards:
        table = pq.read_table(dataset / shard.path, columns=list(SIDES))
        for side in SIDES:
            totals[side] += np.bincount(table[side].to_numpy(), minlength=sizes[side])
    return totals


def side_of(table: str) -> str:
    return next((side for side in SIDES if table.startswith(side)), table)
