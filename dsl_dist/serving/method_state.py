"""How a sparsity method's checkpoint state becomes a table's compact layout: the state-key
adapter between the checkpoint and dsl_dist/serving/artifact.py.

A method's spec (dsl_dist/config/registry.py) names the layout its checkpoint leaves; export
never branches on the method's name. Every layout is one `StateLayout`: the key under
`sparsity.{table}.` that marks it, the keys it reads and how to encode the table from them.
`mask` (dsl, and any method that keeps a weight mask) leaves `sparsity.{table}.mask`;
`blocks` (block_dsl) leaves `sparsity.{table}.widths` and its nested blocks under
`sparsity_blocks.{table}.0`; a table with no sparsity state is dense. A table whose state is
not its layout's is refused, never exported as dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dsl_dist.config import JobConfig
from dsl_dist.serving.artifact import EncodedTable, encode_blocks, encode_dense, encode_masked

Tensors = dict[str, torch.Tensor]


class UnknownState(ValueError):
    """A table's sparsity state matches no layout (the message names the keys)."""


@dataclass(frozen=True)
class StateLayout:
    """One way a method stores a table: `marker` is the key suffix under `sparsity.{table}.`
    that identifies it, `reads` the (prefix, suffix) of every checkpoint key it needs, and
    `encode` makes the table from the tensors, its model weight and the run's config."""

    marker: str
    reads: tuple[tuple[str, str], ...]
    encode: Callable[[Tensors, str, np.ndarray, JobConfig], EncodedTable]


def _masked(tensors: Tensors, table: str, weight: np.ndarray, cfg: JobConfig) -> EncodedTable:
    return encode_masked(weight, tensors[f"sparsity.{table}.mask"].numpy().astype(bool))


def _blocks(tensors: Tensors, table: str, weight: np.ndarray, cfg: JobConfig) -> EncodedTable:
    """Block DSL's nested blocks (the world-size-independent `sparsity_blocks`); a table with
    no active block has no tensor there."""
    blocks = tensors.get(f"sparsity_blocks.{table}.0")
    blocks = (blocks.numpy() if blocks is not None else
              np.zeros((0, cfg.sparsity.block.size), dtype=np.float32))
    return encode_blocks(tensors[f"sparsity.{table}.widths"].numpy(), blocks,
                         cfg.model.embedding_dim)


LAYOUTS: dict[str, StateLayout] = {
    "mask": StateLayout("mask", (("sparsity.", ".mask"),), _masked),
    "blocks": StateLayout("widths", (("sparsity.", ".widths"), ("sparsity_blocks.", ".0")),
                          _blocks),
}
"""By the name a method's spec gives (`MethodSpec.export_layout`); `dense`: none."""


def needed(key: str, layout: str) -> bool:
    """Whether export reads checkpoint key `key` of a run whose method leaves `layout`: the
    model's tables and what the layout reads (not the optimizer's state or the growth
    statistics)."""
    reads = LAYOUTS[layout].reads if layout in LAYOUTS else ()
    return key.startswith("model.") or any(
        key.startswith(prefix) and key.endswith(suffix) for prefix, suffix in reads)


def encode_table(table: str, layout: str, tensors: Tensors, state_keys: set[str],
                 weight: np.ndarray, cfg: JobConfig) -> EncodedTable:
    """`table` in the compact layout `layout` (given every key of the checkpoint): dense when
    it has no sparsity state (the layout is `dense`, or the method left the table whole)."""
    own = sorted(k for k in state_keys if k.startswith(f"sparsity.{table}."))
    if layout in LAYOUTS and f"sparsity.{table}.{LAYOUTS[layout].marker}" in own:
        return LAYOUTS[layout].encode(tensors, table, weight, cfg)
    if own:
        raise UnknownState(f"table {table!r}: sparsity state {own} is not the {layout!r} layout "
                           f"its method's spec names (marker: "
                           f"{LAYOUTS[layout].marker if layout in LAYOUTS else 'none'})")
    return encode_dense(weight)
