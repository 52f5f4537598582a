"""The exported model: a directory of safetensors files and one JSON, nothing pickled.

An artifact holds what serving needs and nothing of training (no optimizer state, no growth
statistics):

- `weights.safetensors`: each embedding table's *active* weights in a compact layout, picked
  per table as the smallest that holds them exactly:
  - `dense` (a dense run, or a table DSL left whole): `T.values` (rows, dim);
  - `bitmask` (weight-level DSL): `T.values`, the active weights in row-major order, and
    `T.mask`, a bit per position (row-major, little-endian bit order within a byte);
  - `csr` (weight-level DSL, very sparse): `T.values`, `T.indptr` (rows + 1) and `T.columns`,
    the active weights' columns, row after row;
  - `blocks` (block DSL): row r's active blocks are its first `T.widths[r]` blocks of `block`
    dimensions (block_shard.py), stored row after row in `T.blocks` (active blocks, block).
- `positives.safetensors`: every user's distinct training items (CSR: `indptr`, `items`), the
  items a recommendation excludes (and LightGCN's graph, see dsl_dist/serving/inference.py).
- `propagated.safetensors` (LightGCN, unless exported without): the final `user` and `item`
  embeddings, propagated at export time as the run propagated them; dense whatever the masks
  (each is a sum of many rows), so they are a serving cache outside the weights' byte bound.
- `ids.json`: the original user and item ids of the data set (`users[i]` is user i).
- `artifact.json`: the model's kind, dimensions and settings, the data set's counts, the byte
  accounting, and a SHA-256 of every other file, checked on reading.

Index arrays use the narrowest unsigned integer type that holds their values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors.numpy import load_file, save

FORMAT = 1
META = "artifact.json"
WEIGHTS = "weights.safetensors"
POSITIVES = "positives.safetensors"
PROPAGATED = "propagated.safetensors"
IDS = "ids.json"
LAYOUTS = ("dense", "bitmask", "csr", "blocks")
BYTES_PER_WEIGHT = 4
"""float32."""


class ArtifactError(RuntimeError):
    """An artifact is missing, of another format, or corrupt (the message names the file)."""


def narrow(values: np.ndarray, maximum: int) -> np.ndarray:
    """`values` as the narrowest unsigned type that holds [0, maximum]."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if maximum <= np.iinfo(dtype).max:
            return values.astype(dtype)
    raise ValueError(f"maximum={maximum}: too large for an index")


@dataclass(frozen=True)
class EncodedTable:
    """One table as stored: its layout, shape (rows, dim), active weights and tensors (named
    without the table's prefix)."""

    layout: str
    shape: tuple[int, int]
    active: int
    tensors: dict[str, np.ndarray]
    block: int = 0

    @property
    def value_bytes(self) -> int:
        name = "blocks" if self.layout == "blocks" else "values"
        return int(self.tensors[name].nbytes)

    @property
    def index_bytes(self) -> int:
        return sum(int(t.nbytes) for name, t in self.tensors.items()
                   if name not in ("values", "blocks"))

    def describe(self) -> dict[str, Any]:
        out = {"layout": self.layout, "rows": self.shape[0], "dim": self.shape[1],
               "active": self.active, "value_bytes": self.value_bytes,
               "index_bytes": self.index_bytes}
        return {**out, "block": self.block} if self.layout == "blocks" else out


def encode_dense(weight: np.ndarray) -> EncodedTable:
    """A table kept whole: weight (rows, dim) float32."""
    return EncodedTable("dense", weight.shape, weight.size, {"values": weight.astype(np.float32)})


def encode_masked(weight: np.ndarray, mask: np.ndarray) -> EncodedTable:
    """The weights of `weight` (rows, dim) where `mask` (rows, dim, bool) is set, as a bit
    mask or as CSR, whichever is smaller."""
    if weight.shape != mask.shape or weight.ndim != 2:
        raise ValueError(f"weight {weight.shape} and mask {mask.shape}: need one (rows, dim)")
    rows, dim = weight.shape
    values = weight[mask].astype(np.float32)
    counts = mask.sum(1)
    indptr = narrow(np.concatenate([[0], np.cumsum(counts)]), len(values))
    columns = narrow(np.nonzero(mask)[1], max(dim - 1, 0))
    bits = np.packbits(mask.reshape(-1), bitorder="little")
    if bits.nbytes <= indptr.nbytes + columns.nbytes:
        return EncodedTable("bitmask", (rows, dim), len(values), {"values": values, "mask": bits})
    return EncodedTable("csr", (rows, dim), len(values),
                        {"values": values, "indptr": indptr, "columns": columns})


def encode_blocks(widths: np.ndarray, blocks: np.ndarray, dim: int) -> EncodedTable:
    """Block DSL's nested blocks: widths (rows,), blocks (sum of widths, block)."""
    block = blocks.shape[1]
    if dim % block or int(widths.sum()) != len(blocks) or (widths > dim // block).any():
        raise ValueError(f"widths (sum {int(widths.sum())}, max {int(widths.max(initial=0))}) "
                         f"and blocks {blocks.shape} do not fit rows of dim {dim}")
    return EncodedTable("blocks", (len(widths), dim), blocks.size,
                        {"widths": narrow(widths, dim // block),
                         "blocks": blocks.astype(np.float32)}, block)


def decode(table: EncodedTable) -> np.ndarray:
    """The table as a dense (rows, dim) float32 array, zeros where weights are inactive."""
    rows, dim = table.shape
    t = table.tensors
    if table.layout == "dense":
        return t["values"]
    out = np.zeros((rows, dim), dtype=np.float32)
    if table.layout == "bitmask":
        mask = np.unpackbits(t["mask"], count=rows * dim, bitorder="little").astype(bool)
        out.reshape(-1)[mask] = t["values"]
    elif table.layout == "csr":
        counts = np.diff(t["indptr"].astype(np.int64))
        out[np.repeat(np.arange(rows), counts), t["columns"].astype(np.int64)] = t["values"]
    else:
        per_row = dim // table.block
        widths = t["widths"].astype(np.int64)
        active = np.arange(per_row)[None, :] < widths[:, None]
        out.reshape(rows, per_row, table.block)[active] = t["blocks"]
    return out


def weight_bound(tables: dict[str, EncodedTable]) -> dict[str, int]:
    """What the weights need at least: active weights × bytes per weight + their index, the
    smallest of those offered (none when dense, a bit per position or CSR when weight-level,
    a byte per row when block-level); `bound` = 1.2 × that."""
    active = sum(t.active for t in tables.values())
    index = sum(t.index_bytes for t in tables.values())
    need = active * BYTES_PER_WEIGHT + index
    return {"active_weights": active, "bytes_per_weight": BYTES_PER_WEIGHT,
            "index_bytes": index, "needed_bytes": need, "bound_bytes": int(1.2 * need)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(directory: Path, meta: dict[str, Any], tables: dict[str, EncodedTable],
                   positives: tuple[np.ndarray, np.ndarray], ids: dict[str, list],
                   propagated: Optional[dict[str, np.ndarray]] = None) -> dict:
    """Writes an artifact into the empty `directory`; returns its artifact.json. Files are
    written as ordinary files (mode from the umask, 0644 by default): safetensors' own
    save_file makes them 0600, unreadable to a server running as another user."""
    (directory / WEIGHTS).write_bytes(save({f"{name}.{key}": value
                                            for name, table in tables.items()
                                            for key, value in table.tensors.items()}))
    indptr, items = positives
    (directory / POSITIVES).write_bytes(save({"indptr": indptr, "items": items}))
    (directory / IDS).write_text(json.dumps(ids))
    names = [WEIGHTS, POSITIVES, IDS]
    if propagated is not None:
        (directory / PROPAGATED).write_bytes(save(propagated))
        names.append(PROPAGATED)
    files = {name: {"sha256": sha256(directory / name), "bytes": (directory / name).stat().st_size}
             for name in names}
    full = {"format": FORMAT, **meta,
            "tables": {name: t.describe() for name, t in tables.items()},
            "files": files}
    (directory / META).write_text(json.dumps(full, indent=1) + "\n")
    return full


@dataclass(frozen=True)
class Artifact:
    """An artifact as read: its meta (artifact.json), tables, positives (indptr, items),
    original ids and LightGCN's propagated embeddings (user, item) if it has them."""

    meta: dict[str, Any]
    tables: dict[str, EncodedTable]
    positives: tuple[np.ndarray, np.ndarray]
    ids: dict[str, list]
    propagated: Optional[dict[str, np.ndarray]] = None


def read_artifact(directory: Path) -> Artifact:
    """Reads and checks an artifact (ArtifactError naming the file that is wrong)."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise ArtifactError(f"{directory}: no {META}, not an exported model")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{meta_path} is corrupt: {exc}") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path}: format {meta.get('format')!r}, this version reads "
                            f"{FORMAT}")
    for name, info in meta["files"].items():
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory}: {name} is missing")
        if sha256(directory / name) != info["sha256"]:
            raise ArtifactError(f"{directory / name} does not match its checksum (corrupt)")
    stored = load_file(str(directory / WEIGHTS))
    tables = {name: EncodedTable(info["layout"], (info["rows"], info["dim"]), info["active"],
                                 {key.split(".", 1)[1]: value for key, value in stored.items()
                                  if key.split(".", 1)[0] == name}, info.get("block", 0))
              for name, info in meta["tables"].items()}
    positives = load_file(str(directory / POSITIVES))
    propagated = (load_file(str(directory / PROPAGATED)) if PROPAGATED in meta["files"]
                  else None)
    return Artifact(meta, tables, (positives["indptr"], positives["items"]),
                    json.loads((directory / IDS).read_text()), propagated)
