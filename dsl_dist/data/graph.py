"""The train interaction graph for LightGCN: its normalised adjacency, and propagation bags.

LightGCN's final embeddings are linear in the layer-0 tables: e = P E0 with P = Σ_k α_k Â^k
(k = 0..K, α_k = 1/(K+1)), where Â is the symmetric-normalised adjacency of the bipartite train
graph (users are nodes 0..U-1, item i is node U+i). When the tables fit on every rank, the
model multiplies by Â (dsl_dist/model/lightgcn.py). Sharded tables cannot be, but row v of
P' = P − α_0 I is a fixed weighted bag of user rows plus one of item rows, so
e(v) = α_0 E0[v] + two weighted EmbeddingBag lookups. `propagation_bags` computes those rows a
block at a time (P is nearly dense beyond two hops, so it is never held whole) and keeps the
largest weights of each; `load_propagation_bags` caches them next to the prepared data set as
Arrow files that the ranks of a machine memory-map, so that they share the pages.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from dsl_dist.data.errors import DataError
from dsl_dist.data.manifest import Manifest
from dsl_dist.data.prepare import move_into_place
from dsl_dist.data.stream import ShardReader

CACHE_FORMAT = 1
CACHE_META = "meta.json"
BAG_NAMES = ("user_to_users", "user_to_items", "item_to_users", "item_to_items")
BAG_SCHEMA = pa.schema([("ids", pa.large_list(pa.int64())),
                        ("weights", pa.large_list(pa.float32()))])
"""One Arrow file per bag set: one record batch, a row per bag; both columns share offsets."""
BLOCK_BYTES = 512 << 20
"""Working memory of `propagation_bags`: it holds about three dense N-wide rows per node."""


@dataclass(frozen=True)
class InteractionGraph:
    """The bipartite train graph, one (users[k], items[k]) pair per edge; a repeated pair is one
    edge."""

    num_users: int
    num_items: int
    users: np.ndarray
    items: np.ndarray

    def __post_init__(self) -> None:
        if self.num_users < 0 or self.num_items < 0:
            raise ValueError(f"num_users={self.num_users}, num_items={self.num_items}: "
                             "must be >= 0")
        if self.users.ndim != 1 or self.users.shape != self.items.shape:
            raise ValueError(f"users {self.users.shape} and items {self.items.shape}: need two "
                             "1-D arrays of one length")
        for name, ids, count in (("users", self.users, self.num_users),
                                 ("items", self.items, self.num_items)):
            if len(ids) and (ids.min() < 0 or ids.max() >= count):
                raise ValueError(f"{name}: id {int(ids.max() if ids.max() >= count else ids.min())}"
                                 f" outside [0, {count})")

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    def normalized_adjacency(self) -> torch.Tensor:
        """Â = D^-1/2 A D^-1/2 (num_nodes × num_nodes, float32, CSR, symmetric); isolated
        nodes have empty rows."""
        users, items, weights = _normalized_edges(self)
        items = items + self.num_users
        return _csr(np.concatenate([users, items]), np.concatenate([items, users]),
                    np.concatenate([weights, weights]), (self.num_nodes, self.num_nodes))


def read_graph(dataset_dir: Path) -> InteractionGraph:
    """The distinct (user, item) pairs of a prepared data set's train split, streamed a row group
    at a time with checksums verified."""
    manifest = Manifest.load(dataset_dir)
    reader = ShardReader(dataset_dir, manifest, verify_checksums=True)
    width = max(manifest.num_items, 1)
    keys = [np.unique(users.astype(np.int64) * width + items)
            for users, items in map(reader.read, reader.row_groups("train"))]
    edges = np.unique(np.concatenate(keys)) if keys else np.empty(0, np.int64)
    return InteractionGraph(manifest.num_users, manifest.num_items, edges // width, edges % width)


@dataclass(frozen=True)
class CSRBags:
    """Weighted bags in CSR form: bag r holds ids[indptr[r]:indptr[r+1]] with weights[...]
    (ids into one table; their order within a bag is unspecified)."""

    indptr: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        if (self.indptr.dim() != 1 or len(self.indptr) == 0 or self.ids.dim() != 1
                or self.ids.shape != self.weights.shape):
            raise ValueError(f"indptr {tuple(self.indptr.shape)}, ids {tuple(self.ids.shape)}, "
                             f"weights {tuple(self.weights.shape)}: need (rows + 1,), (n,), (n,)")
        if (self.indptr.dtype, self.ids.dtype, self.weights.dtype) != (
                torch.int64, torch.int64, torch.float32):
            raise ValueError(f"dtypes {self.indptr.dtype}, {self.ids.dtype}, "
                             f"{self.weights.dtype}: need int64, int64, float32")
        if (self.indptr[0] != 0 or self.indptr[-1] != len(self.ids)
                or bool((self.indptr[1:] < self.indptr[:-1]).any())):
            raise ValueError(f"indptr: must rise from 0 to len(ids) = {len(self.ids)}")

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    def lengths(self) -> torch.Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lengths int32 (len(rows),), ids, weights) of the bags of `rows`, one after another."""
        if rows.dim() != 1 or rows.is_floating_point() or rows.is_complex():
            raise ValueError(f"rows: need a 1-D integer tensor, got {rows.dtype} "
                             f"{tuple(rows.shape)}")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = rows.max() if rows.max() >= self.num_rows else rows.min()
            raise ValueError(f"rows: row {int(bad)} outside [0, {self.num_rows})")
        rows = rows.to(torch.int64)
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        total = int(lengths.sum())
        offsets = torch.cumsum(lengths, 0) - lengths  # where each bag starts in the output
        index = torch.repeat_interleave(starts - offsets, lengths, output_size=total)
        index += torch.arange(total, device=index.device)
        return lengths.to(torch.int32), self.ids[index], self.weights[index]


@dataclass(frozen=True)
class PropagationBags:
    """Row v of P' = P − α_0 I split by table, so that LightGCN's e(v) is
    self_weight · E0[v] + the weighted sums of its user bag and its item bag. With
    max_neighbours = M > 0 each bag keeps its M largest weights; M = 0 keeps them all (exact)."""

    num_layers: int
    max_neighbours: int
    user_to_users: CSRBags
    """Rows: users; ids: user ids (even hops >= 2, including walks back to the user)."""
    user_to_items: CSRBags
    """Rows: users; ids: item ids (odd hops)."""
    item_to_users: CSRBags
    """Rows: items; ids: user ids (odd hops)."""
    item_to_items: CSRBags
    """Rows: items; ids: item ids (even hops >= 2)."""

    def __post_init__(self) -> None:
        check_num_layers(self.num_layers)
        _check_neighbours(self.max_neighbours)
        num_users, num_items = self.user_to_users.num_rows, self.item_to_items.num_rows
        for name in BAG_NAMES:
            bags: CSRBags = getattr(self, name)
            rows = num_users if name.startswith("user") else num_items
            ids = num_users if name.endswith("users") else num_items
            if bags.num_rows != rows:
                raise ValueError(f"{name}: {bags.num_rows} rows, need {rows}")
            if len(bags.ids) and (bags.ids.min() < 0 or bags.ids.max() >= ids):
                raise ValueError(f"{name}: ids outside [0, {ids})")
            if self.max_neighbours and len(bags.ids) and bags.lengths().max() > self.max_neighbours:
                raise ValueError(f"{name}: a bag holds more than max_neighbours="
                                 f"{self.max_neighbours} ids")

    @property
    def self_weight(self) -> float:
        """α_0, the weight of a node's own layer-0 row."""
        return 1.0 / (self.num_layers + 1)


def propagation_bags(graph: InteractionGraph, num_layers: int,
                     max_neighbours: int) -> PropagationBags:
    """The bags of every node, computed a block of nodes at a time (at most `BLOCK_BYTES` of
    dense rows) and truncated per block, so that P is never held whole."""
    check_num_layers(num_layers)
    _check_neighbours(max_neighbours)
    block = max(1, BLOCK_BYTES // (3 * 4 * max(graph.num_nodes, 1)))
    bags = {}
    for side in ("user", "item"):
        kept: dict[str, list] = {"users": [], "items": []}
        for to_users, to_items in _dense_rows(graph, num_layers, side, block):
            kept["users"].append(_largest(to_users, max_neighbours))
            kept["items"].append(_largest(to_items, max_neighbours))
        for table, parts in kept.items():
            bags[f"{side}_to_{table}"] = _concat_bags(parts, scale=1.0 / (num_layers + 1))
    return PropagationBags(num_layers, max_neighbours, **bags)


def load_propagation_bags(dataset_dir: Path, num_layers: int,
                          max_neighbours: int) -> PropagationBags:
    """The bags of a prepared data set, memory-mapped from its cache directory
    `propagation-K{num_layers}-M{max_neighbours}/`, which the first call builds (one process at
    a time: the others wait on a lock file and then map what it wrote).

    A stale cache (made from other train shards, as when the data set was prepared again, or
    in another format) is rebuilt and replaced; a damaged one (files missing or unreadable:
    never the result of a failed build, as the cache only appears once complete) raises
    DataError naming it, to be deleted by hand. The returned
    tensors share the read-only mapped pages: do not write to them."""
    check_num_layers(num_layers)
    _check_neighbours(max_neighbours)
    dataset_dir = Path(dataset_dir)
    manifest = Manifest.load(dataset_dir)
    cache = dataset_dir / f"propagation-K{num_layers}-M{max_neighbours}"
    meta = {"format": CACHE_FORMAT, "num_layers": num_layers, "max_neighbours": max_neighbours,
            "num_users": manifest.num_users, "num_items": manifest.num_items,
            "train_sha256": [shard.sha256 for shard in manifest.split("train").shards]}
    if not _is_current(cache, meta):
        with _exclusive(dataset_dir / f".{cache.name}.lock"):
            if not _is_current(cache, meta):  # not written meanwhile by another process
                _write_cache(propagation_bags(read_graph(dataset_dir), num_layers,
                                              max_neighbours), cache, meta)
    return _read_cache(cache, num_layers, max_neighbours)


def check_num_layers(num_layers: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r}: must be an integer >= 1")


def _check_neighbours(max_neighbours: int) -> None:
    if isinstance(max_neighbours, bool) or not isinstance(max_neighbours, int) \
            or max_neighbours < 0:
        raise ValueError(f"max_neighbours={max_neighbours!r}: must be an integer >= 0 "
                         "(0 keeps every neighbour)")


def _normalized_edges(graph: InteractionGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct edges sorted by (user, item), weighted 1/sqrt(deg(user) deg(item))."""
    width = max(graph.num_items, 1)
    edges = np.unique(graph.users.astype(np.int64) * width + graph.items)
    users, items = edges // width, edges % width
    degrees = (np.bincount(users, minlength=graph.num_users).astype(np.float64)[users]
               * np.bincount(items, minlength=graph.num_items)[items])
    return users, items, (1.0 / np.sqrt(degrees)).astype(np.float32)


def _csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
         shape: tuple[int, int]) -> torch.Tensor:
    order = np.lexsort((cols, rows))
    crow = np.r_[0, np.cumsum(np.bincount(rows, minlength=shape[0]))]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(crow.astype(np.int64)),
                                       torch.from_numpy(cols[order].astype(np.int64)),
                                       torch.from_numpy(values[order]), shape,
                                       check_invariants=False)


def _dense_rows(graph: InteractionGraph, num_layers: int, side: str,
                block: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rows of Σ_{k=1..K} Â^k = (K + 1) P' for the users (side "user") or items, `block` at a
    time, as dense (rows × num_users) and (rows × num_items) float32 tensors.

    Â is bipartite with blocks R (users × items) and Rᵀ, so hops alternate between the two
    tables: the work holds column vectors of the other side after odd hops and of this side
    after even ones, each hop one product with R or Rᵀ (half of Â's nonzeros). The rows come
    as transposed views of those columns."""
    users, items, weights = _normalized_edges(graph)
    shape = (graph.num_users, graph.num_items)
    user_items = _csr(users, items, weights, shape)
    item_users = _csr(items, users, weights, shape[::-1])
    own, other = (user_items, item_users) if side == "user" else (item_users, user_items)
    crow, col, values = own.crow_indices(), own.col_indices(), own.values()
    for start in range(0, own.shape[0], block):
        stop = min(start + block, own.shape[0])
        lo, hi = int(crow[start]), int(crow[stop])
        hop = torch.zeros(own.shape[1], stop - start)  # hop 1: the rows' own edges, transposed
        hop[col[lo:hi], torch.repeat_interleave(torch.arange(stop - start),
                                                crow[start + 1:stop + 1] - crow[start:stop])] = (
            values[lo:hi])
        odd, even = hop, None  # sums of hops; each hop is read only by the next one
        for k in range(2, num_layers + 1):
            hop = torch.sparse.mm(own if k % 2 == 0 else other, hop)
            if k % 2:
                odd.add_(hop)
            elif even is None:
                even = hop
            else:
                even.add_(hop)
        if even is None:
            even = torch.zeros(own.shape[0], stop - start)
        yield (even.T, odd.T) if side == "user" else (odd.T, even.T)


def _largest(rows: torch.Tensor, max_neighbours: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lengths, ids, weights) of the nonzeros of each row, the `max_neighbours` largest
    (0: all)."""
    if max_neighbours == 0 or max_neighbours >= rows.shape[1]:
        row, ids = rows.nonzero(as_tuple=True)
        return torch.bincount(row, minlength=rows.shape[0]), ids, rows[row, ids]
    weights, ids = rows.topk(max_neighbours, dim=1)
    keep = weights > 0  # rows with fewer nonzeros than max_neighbours
    return keep.sum(dim=1), ids[keep], weights[keep]


def _concat_bags(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 scale: float) -> CSRBags:
    """One CSRBags of consecutive (lengths, ids, weights) parts, the weights times `scale`."""
    lengths, ids, weights = (torch.cat(p) for p in zip(*parts)) if parts else (
        torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0))
    return CSRBags(torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)]),
                   ids, weights * scale)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    try:
        lock = lock_path.open("a")
    except OSError as exc:
        raise DataError(f"{lock_path}: cannot create the cache lock ({exc}); build the "
                        "propagation cache where the data set is writable") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _is_current(cache: Path, meta: dict) -> bool:
    """Whether `cache` holds the bags described by `meta`: False when it is missing or stale
    (other train shards, another format); DataError when it is not a complete cache."""
    if not cache.exists():
        return False
    try:
        written = json.loads((cache / CACHE_META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{cache}: not a complete propagation cache ({exc}); delete it to have "
                        "it rebuilt") from None
    return written == meta


def _write_cache(bags: PropagationBags, cache: Path, meta: dict) -> None:
    """Writes the bags to a sibling staging directory and renames it to `cache` (replacing an
    old one), so that `cache` is never incomplete."""
    staging = cache.with_name(f".{cache.name}-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        for name in BAG_NAMES:
            csr: CSRBags = getattr(bags, name)
            offsets = pa.array(csr.indptr.numpy())
            batch = pa.record_batch(
                [pa.LargeListArray.from_arrays(offsets, pa.array(csr.ids.numpy())),
                 pa.LargeListArray.from_arrays(offsets, pa.array(csr.weights.numpy()))],
                schema=BAG_SCHEMA)
            with pa.OSFile(str(staging / f"{name}.arrow"), "wb") as sink, \
                    ipc.new_file(sink, batch.schema) as writer:
                writer.write_batch(batch)
        (staging / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n")
        move_into_place(staging, cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_cache(cache: Path, num_layers: int, max_neighbours: int) -> PropagationBags:
    bags = {}
    for name in BAG_NAMES:
        path = cache / f"{name}.arrow"
        try:
            reader = ipc.open_file(pa.memory_map(str(path)))
            if reader.num_record_batches != 1 or not reader.schema.equals(BAG_SCHEMA):
                raise ValueError(f"need one record batch of {BAG_SCHEMA}")
            batch = reader.get_batch(0)
            ids, weights = batch.column("ids"), batch.column("weights")
            if ids.null_count or weights.null_count or not ids.offsets.equals(weights.offsets):
                raise ValueError("ids and weights differ in their bags")
            with warnings.catch_warnings():  # the tensors share the read-only mapped pages
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                bags[name] = CSRBags(*(torch.from_numpy(a.to_numpy()) for a in
                                       (ids.offsets, ids.values, weights.values)))
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DataError(f"{path}: damaged propagation cache ({exc}); delete {cache} to have "
                            "it rebuilt") from None
    try:
        return PropagationBags(num_layers, max_neighbours, **bags)
    except ValueError as exc:
        raise DataError(f"{cache}: damaged propagation cache ({exc}); delete it to have it "
                        "rebuilt") from None
