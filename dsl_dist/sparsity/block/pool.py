"""Block pools: the compact tables of structured DSL, on the model's side.

A sparsified table of N rows × D dimensions is split into blocks of b consecutive dimensions
(J = D / b block positions per row), and only its active blocks are stored: in a *pool*, an
ordinary TorchRec table of `capacity` rows of width b, which DistributedModelParallel shards
(table- or row-wise) and the fused optimizer updates like any table. `BlockEmbeddingBagCollection`
stands in for an `EmbeddingBagCollection` of the plain model: for each feature of a pooled table
it sends J features (block j of every looked-up row) under the row's *proxy id*, and
concatenates their pooled outputs back into the D-wide embedding the model sees.

Proxy ids carry the virtual row to the rank that holds its blocks. The pool has about f = A/1024
rows per virtual row (density × J × (1 + headroom), at least 1), and row r is sent as
p(r) = ⌊r·A/1024⌋: row-wise sharding gives each rank a contiguous range of pool rows, and so
of proxies, and that rank keeps the blocks of exactly the virtual rows whose proxies it owns, in
those pool rows (its slots). Its embedding kernel turns (p, j) into the slot of block j of row
r, or drops the id from its bag when that block is inactive, so that the bag pools to zeros
(dsl_dist/sparsity/block/shard.py). No rank holds a per-row structure for rows it does not own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

PROXY_SCALE = 1024
"""The capacity factor is a multiple of 1/PROXY_SCALE blocks per row."""


@dataclass(frozen=True)
class PoolGeometry:
    """How a table of `num_rows` × `dim` is pooled in blocks of `block` dimensions, with
    `factor` / PROXY_SCALE pool rows (slots) per virtual row (factor >= PROXY_SCALE)."""

    num_rows: int
    dim: int
    block: int
    factor: int

    @classmethod
    def of(cls, num_rows: int, dim: int, block: int, density: float,
           headroom: float) -> PoolGeometry:
        blocks_per_row = dim // block
        factor = max(PROXY_SCALE, math.ceil(density * blocks_per_row * (1 + headroom)
                                            * PROXY_SCALE))
        return cls(num_rows, dim, block, factor)

    @property
    def blocks_per_row(self) -> int:
        return self.dim // self.block

    @property
    def capacity(self) -> int:
        """Rows of the pool table: one past the proxy of the last row."""
        return (self.num_rows - 1) * self.factor // PROXY_SCALE + 1 if self.num_rows else 0

    def proxy(self, rows: torch.Tensor) -> torch.Tensor:
        return rows * self.factor // PROXY_SCALE

    def row_of(self, proxies: torch.Tensor | int) -> torch.Tensor | int:
        """The virtual row of a proxy; for any pool row, the first row whose proxy is not
        below it (so the rows of pool rows [a, b) are [row_of(a), row_of(b)))."""
        return (proxies * PROXY_SCALE + self.factor - 1) // self.factor


@dataclass(frozen=True)
class _Expansion:
    """How a batch of some keys and stride becomes the pool's: features `order` (indices into
    the batch's, repeated J times for a pooled one) under `keys`, each id times its feature's
    factor (`bag_factors`: per bag) // PROXY_SCALE."""

    keys: list[str]
    order: list[int]
    order_tensor: torch.Tensor
    bag_factors: torch.Tensor


def block_feature(feature: str, block: int) -> str:
    """The pool's feature for block position `block` of `feature`."""
    return f"{feature}#b{block}"


class BlockEmbeddingBagCollection(nn.Module):
    """An EmbeddingBagCollection whose tables in `geometries` are stored as block pools (the
    others as they are). To the model it is the collection it replaces: the same features and
    tables (`embedding_bag_configs`), and D-wide pooled embeddings out."""

    def __init__(self, collection: EmbeddingBagCollection,
                 geometries: dict[str, PoolGeometry]) -> None:
        super().__init__()
        self._virtual_tables = collection.embedding_bag_configs()
        self._weighted = collection.is_weighted()
        self.geometries = geometries
        self.pooled_features = {f: geometries[t.name] for t in self._virtual_tables
                                if t.name in geometries for f in t.feature_names}
        tables = [EmbeddingBagConfig(name=t.name, embedding_dim=geometries[t.name].block,
                                     num_embeddings=geometries[t.name].capacity,
                                     feature_names=[block_feature(f, j) for f in t.feature_names
                                                    for j in range(geometries[t.name]
                                                                   .blocks_per_row)],
                                     pooling=t.pooling)
                  if t.name in geometries else t for t in self._virtual_tables]
        self.pool = EmbeddingBagCollection(tables=tables, is_weighted=self._weighted,
                                           device=torch.device("meta"))
        self._dims = {f: t.embedding_dim for t in self._virtual_tables for f in t.feature_names}
        self._orders: dict[tuple[str, ...], tuple[list[str], list[int]]] = {}
        self._expansions: dict[tuple[tuple[str, ...], int, torch.device], _Expansion] = {}

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The tables as the model declared them (N × D)."""
        return self._virtual_tables

    def is_weighted(self) -> bool:
        return self._weighted

    def _expand(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Every pooled feature as its J block features, each id as its row's proxy: a
        product per id and one permutation (with repeats) of the features, of sizes known on
        the host, so that nothing is read back from the device."""
        plan = self._expansion(tuple(features.keys()), features.stride(), features.device())
        factors = torch.repeat_interleave(plan.bag_factors, features.lengths(),
                                          output_size=features.values().numel())
        proxied = KeyedJaggedTensor(
            keys=features.keys(), values=features.values() * factors // PROXY_SCALE,
            weights=features.weights_or_none(), lengths=features.lengths(),
            stride=features.stride(), length_per_key=features.length_per_key())
        expanded = proxied.permute(plan.order, plan.order_tensor)
        return KeyedJaggedTensor(keys=plan.keys, values=expanded.values(),
                                 weights=expanded.weights_or_none(), lengths=expanded.lengths(),
                                 stride=features.stride(),
                                 length_per_key=expanded.length_per_key())

    def _expansion(self, keys: tuple[str, ...], stride: int, device: torch.device) -> _Expansion:
        if (keys, stride, device) not in self._expansions:
            order, factors, expanded = [], [], []
            for f, key in enumerate(keys):
                geometry = self.pooled_features.get(key)
                factors.append(geometry.factor if geometry else PROXY_SCALE)
                blocks = geometry.blocks_per_row if geometry else 1
                order += [f] * blocks
                expanded += [block_feature(key, j) for j in range(blocks)] if geometry \
                    else [key]
            self._expansions[(keys, stride, device)] = _Expansion(
                expanded, order, torch.tensor(order, dtype=torch.int32, device=device),
                torch.tensor(factors, device=device).repeat_interleave(stride))
        return self._expansions[(keys, stride, device)]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """The pool's output as it is: the J block features of a feature come out as
        consecutive columns, in order, which together are that feature's D-wide embedding."""
        return _virtual_output(self, self.pool(_expand(self, features)))

    def _virtual_output(self, out: KeyedTensor) -> KeyedTensor:
        keys, dims = self._virtual_order(tuple(out.keys()))
        return KeyedTensor(keys=keys, length_per_key=dims, values=out.values())

    def _virtual_order(self, pool_keys: tuple[str, ...]) -> tuple[list[str], list[int]]:
        """The features (and widths) in the order the pool's output holds them, which the
        sharding decides; checked once for every order seen."""
        if pool_keys not in self._orders:
            keys, dims, position = [], [], 0
            while position < len(pool_keys):
                feature = pool_keys[position].rpartition("#b")[0] or pool_keys[position]
                geometry = self.pooled_features.get(feature)
                span = geometry.blocks_per_row if geometry else 1
                expected = [block_feature(feature, j) for j in range(span)] if geometry \
                    else [feature]
                if list(pool_keys[position:position + span]) != expected:
                    raise RuntimeError(f"pool output {pool_keys}: the blocks of {feature!r} "
                                       "are not consecutive")
                keys.append(feature)
                dims.append(self._dims[feature])
                position += span
            self._orders[pool_keys] = (keys, dims)
        return self._orders[pool_keys]

@torch.fx.wrap
def _expand(collection: BlockEmbeddingBagCollection,
            features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """collection._expand(features), one opaque call to FX tracing: TorchRec's train pipeline
    traces the model (train.pipeline=sparse_dist) and cannot trace through the expansion, so
    it runs the pool's input distribution in the step instead of ahead of it."""
    return collection._expand(features)


@torch.fx.wrap
def _virtual_output(collection: BlockEmbeddingBagCollection, out: KeyedTensor) -> KeyedTensor:
    """collection._virtual_output(out), opaque to FX tracing likewise."""
    return collection._virtual_output(out)


def pool_collections(model: nn.Module, names: set[str], block: int, density: float,
                     headroom: float) -> nn.Module:
    """`model` (plain, on the meta device) with every EmbeddingBagCollection that holds tables
    in `names` replaced by a BlockEmbeddingBagCollection pooling those tables."""
    for name, child in list(model.named_children()):
        if isinstance(child, EmbeddingBagCollection):
            geometries = {t.name: PoolGeometry.of(t.num_embeddings, t.embedding_dim, block,
                                                  density, headroom)
                          for t in child.embedding_bag_configs() if t.name in names}
            if geometries:
                setattr(model, name, BlockEmbeddingBagCollection(child, geometries))
        else:
            pool_collections(child, names, block, density, headroom)
    return model


def block_collections(model: nn.Module) -> list[BlockEmbeddingBagCollection]:
    return [m for m in model.modules() if isinstance(m, BlockEmbeddingBagCollection)]
