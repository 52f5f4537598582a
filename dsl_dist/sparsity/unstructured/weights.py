"""Drop-and-grow of single weights on the local shards of a sharded model, with an exact
cluster-wide budget: the unit of selection of the unstructured methods (such as dsl.py),
which supply only their grow scores (and may replace the magnitude drop).

Every rank holds the masks of its own shards (masks.py: a bit per weight). Initial masks and
every drop-and-grow are chosen by an exact distributed selection over the candidates of all
ranks (streaming.py), whose rounds of counts are all-reduced over the training process group,
so the choice is exact, deterministic and independent of the world size and of where the
controller lives; it visits the shards a chunk of rows at a time, so an update's extra memory
is bounded by `sparsity.update_memory_mb`, not by the tables. The controller
(dsl_dist/control) only says how many weights each update moves and keeps the outcome.
Data-parallel tables are replicated: rank 0 alone offers their candidates and broadcasts the
result.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

from dsl_dist.config import ConfigError, UnstructuredConfig
from dsl_dist.distributed import DistContext
from dsl_dist.model.shards import DenseBlock, WeightBlock, dense_blocks, local_table_shards
from dsl_dist.sparsity.base import Controller, SparsitySetup
from dsl_dist.sparsity.budget import Group, budget_groups, position_bases
from dsl_dist.sparsity.engine import DropAndGrow, sharded_state
from dsl_dist.sparsity.selection.fastops import pack_bits, popcount, unpack_bits, zero_where_
from dsl_dist.sparsity.selection.hashing import uniform_hash
from dsl_dist.sparsity.selection.streaming import Selection, select_streaming
from dsl_dist.sparsity.unstructured.candidates import ShardCandidates
from dsl_dist.sparsity.unstructured.growth import GrowthRecorder
from dsl_dist.sparsity.unstructured.masks import MaskedShard

_BYTES_PER_ENTRY = 32
"""Temporaries of a pass per weight of its chunk (keys, scores, masks, positions)."""
W = TypeVar("W", bound="WeightDropAndGrow")


def table_shapes(tables: list[BaseEmbeddingConfig],
                 dense: Sequence[DenseBlock]) -> dict[str, tuple[int, int]]:
    """(rows, cols) of every table and dense block, by name, in name order: the order of the
    global positions (see masks.py), sparsified or not."""
    shapes = {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
    shapes.update({b.table: (b.num_rows, b.num_cols) for b in dense})
    return dict(sorted(shapes.items()))


def sparsified_tables(cfg: UnstructuredConfig, tables: list[BaseEmbeddingConfig],
                      dense: Sequence[DenseBlock]) -> list[str]:
    """The tables `sparsity.tables` names (all if empty; one the model lacks is refused) and
    the dense blocks, in name order."""
    names = [t.name for t in tables]
    unknown = sorted(set(cfg.tables) - set(names))
    if unknown:
        raise ConfigError(f"sparsity.tables={cfg.tables!r}: no table(s) {unknown}; the model "
                          f"has {sorted(names)}")
    return sorted([*(cfg.tables or names), *(b.table for b in dense)])


def build_weight_method(setup: SparsitySetup, method: type[W]) -> W:
    """`method` over the sparsified tables and dense parameters of `setup.model`."""
    cfg = setup.cfg
    dense = dense_blocks(setup.model, cfg.dense_parameters, setup.dense_optimizer)
    shapes = table_shapes(setup.tables, dense)
    names = sparsified_tables(cfg, setup.tables, dense)
    groups = budget_groups(cfg, {n: shapes[n][0] * shapes[n][1] for n in names})
    controller = setup.connect([g.budget for g in groups], 1)
    blocks = [s for s in [*local_table_shards(setup.model), *dense] if s.table in names]
    return method(cfg, blocks, shapes, groups, setup.ctx, setup.seed, controller)


class WeightDropAndGrow(DropAndGrow):
    """Masks and drop-and-grow for this rank's `blocks` (table shards and dense parameters) of
    the tables ranked in `groups`, positioned among all tables in `shapes`; `controller`
    plans the updates. A method supplies `drop_entries` and `grow_entries`."""

    grow_score_bits = 32
    """Bits of the grow scores' dtype (exact selection histograms them)."""

    @staticmethod
    def statistic_dtype(cfg: UnstructuredConfig) -> torch.dtype:
        """The dtype of the shards' growth statistic (unused by a method that reads no
        gradient)."""
        return torch.bfloat16

    def __init__(self, cfg: UnstructuredConfig, blocks: Sequence[WeightBlock],
                 shapes: dict[str, tuple[int, int]], groups: list[Group], ctx: DistContext,
                 seed: int, controller: Controller) -> None:
        sizes = {name: rows * cols for name, (rows, cols) in shapes.items()}
        bases = position_bases(sizes)
        names = sorted(n for g in groups for n in g.tables)
        shards = [MaskedShard(b, bases[b.table], self.statistic_dtype(cfg)) for b in blocks]
        super().__init__(cfg, shards, groups, {n: sizes[n] for n in names}, 1, ctx, seed,
                         controller)
        self.table_shapes = {n: shapes[n] for n in names}
        self.position_bits = max(1, sum(sizes.values()).bit_length())
        self.elements = max(1 << 12, (cfg.update_memory_mb << 20) // _BYTES_PER_ENTRY)
        self.recorder = GrowthRecorder(self.shards, ctx.world_size,
                                       mask_gradients=(cfg.mask_gradients and
                                                       cfg.reset_optimizer_state))
        self._checkpoint_views: dict[tuple[int, str], torch.Tensor] = {}
        self._init_masks()

    def _offers(self, shard: MaskedShard) -> bool:
        """Whether this rank offers the shard's candidates (replicated ones: rank 0 only)."""
        return not shard.shard.replicated or self.ctx.is_main

    def _select(self, group: Group, k: int, largest: bool, entries: Callable,
                absolute: bool = False, score_bits: int = 32
                ) -> tuple[ShardCandidates, Selection]:
        """The k extreme candidates of `group` over all ranks, and this rank's candidates."""
        source = ShardCandidates([s for s in self._members(group) if self._offers(s)],
                                 entries, self.elements, self.position_bits, absolute)
        return source, select_streaming(source, k, largest=largest,
                                        reduce_counts=self.ctx.all_reduce_sum,
                                        position_bits=self.position_bits,
                                        score_bits=score_bits,
                                        tie_memory=self.cfg.update_memory_mb << 20)

    def _chosen_bits(self, source: ShardCandidates, selection: Selection
                     ) -> dict[int, torch.Tensor]:
        """The selection's choice on this rank, a packed mask per offered shard (by id)."""
        chosen = {id(s): torch.zeros_like(s.bits) for s in source.shards}
        for index, rows in source.shard_chunks():
            shard = source.shards[index]
            chosen[id(shard)][rows] = selection.chosen(source.chunk(index, rows),
                                                       source.tie_keys)
        return chosen

    def _broadcast_replicated(self, group: Group, *packed: str) -> None:
        """Rank 0's `packed` bit tensors of the group's replicated shards, on every rank."""
        for s in self._members(group):
            if s.shard.replicated:
                for name in packed:
                    self.ctx.broadcast_tensor(getattr(s, name))

    def _initial_scores(self, s: MaskedShard, rows: slice) -> tuple[torch.Tensor, None]:
        """The initial mask's score of each weight of `rows` (smallest first): its position's
        hash in [0, 1), plus its column under init_mask=prefix (so columns fill in order)."""
        scores = uniform_hash(s.positions(rows), self.seed)
        if self.cfg.init_mask == "prefix":
            scores += torch.arange(s.shard.col_offset, s.shard.col_offset + s.num_cols,
                                   dtype=scores.dtype, device=scores.device)
        return scores, None

    @torch.no_grad()
    def _init_masks(self) -> None:
        """Exactly `budget` active weights per group, at the positions of smallest initial
        score."""
        for group in self.groups:
            source, chosen = self._select(group, group.budget, False, self._initial_scores)
            bits = self._chosen_bits(source, chosen)
            for s in source.shards:
                s.bits = bits[id(s)]
            self._broadcast_replicated(group, "bits")
            for s in self._members(group):
                s.apply_(elements=self.elements)

    def drop_entries(self, s: MaskedShard, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The drop scores of `rows` (smallest drop first; absolute values are taken) and
        the candidates among them (packed): here magnitude, the active weights of smallest
        |w|, the drop of DSL and of SET."""
        return s.shard.weight[rows], s.bits[rows]

    def grow_entries(self, s: MaskedShard, rows: slice, dropped: torch.Tensor, step: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The grow scores (largest grow first) of `rows` at update step `step` and the
        candidates among them (packed), given the rows' weights this update drops."""
        raise NotImplementedError

    def capture_gradients(self, capturing: bool) -> None:
        self.recorder.capturing = capturing

    def after_backward(self) -> None:
        self.recorder.after_backward()

    def after_step(self, step: int) -> None:
        """Re-zeroes pruned weights of the rows this step updated."""
        for s in self.shards:
            s.apply_(None if s.shard.replicated else self.recorder.take_touched_rows(s),
                     elements=self.elements)

    def drop_and_grow(self, group: Group, k: int, step: int
                      ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Packed masks of the dropped and grown weights of the shards this rank offers."""
        drops, drop = self._select(group, k, False, self.drop_entries, absolute=True)
        dropped = self._chosen_bits(drops, drop)
        grows, grow = self._select(group, k, True, lambda s, rows: self.grow_entries(
            s, rows, dropped[id(s)][rows], step), score_bits=self.grow_score_bits)
        return dropped, self._chosen_bits(grows, grow)

    def clear_statistics(self) -> None:
        for s in self.shards:
            s.growth.zero_()

    def move(self, group: Group, dropped: dict[int, torch.Tensor],
             grown: dict[int, torch.Tensor], step: int) -> torch.Tensor:
        """Applies the group's drop and grow (packed masks of the shards this rank offers):
        new masks (rank 0's for replicated shards), reset optimizer state, dropped weights
        zeroed (the others inactive are zero already: every step re-zeroes the rows it
        updated) and grown ones initialised. Returns this rank's (dropped, grown, regrown)
        counts."""
        moved = torch.zeros(3, dtype=torch.int64)
        for s in self._members(group):
            old = s.bits
            if id(s) in dropped:
                drop, grow = dropped[id(s)], grown[id(s)]
                moved += torch.tensor([popcount(drop), popcount(grow),
                                       popcount(grow & (s.dropped_bits | drop))])
                s.dropped_bits |= drop
                new = (old & ~drop) | grow
            else:
                new = torch.empty_like(old)
            if s.shard.replicated:
                self.ctx.broadcast_tensor(new)
                self.ctx.broadcast_tensor(s.dropped_bits)
            for rows in s.row_chunks(self.elements):
                if self.cfg.reset_optimizer_state:
                    self._reset_optimizer_state(s, rows, old[rows], new[rows])
                zero_where_(s.shard.weight[rows], old[rows] & ~new[rows])
                if self.cfg.grow_init_std:
                    self._initialise_grown(s, rows, new[rows] & ~old[rows], step)
            s.bits = new
        return moved

    def _initialise_grown(self, s: MaskedShard, rows: slice, grown: torch.Tensor,
                          step: int) -> None:
        """Gives the weights grown in `rows` (packed) a uniform value of std grow_init_std,
        a pure function of (seed, step, position): the same on any world size."""
        flat = torch.nonzero(unpack_bits(grown, s.num_cols).reshape(-1)).flatten()
        if not len(flat):
            return
        unit = uniform_hash(s.positions_at(flat + rows.start * s.num_cols), self.seed + step)
        values = (2 * unit - 1) * (3 ** 0.5 * self.cfg.grow_init_std)
        row, col = flat // s.num_cols, flat % s.num_cols
        s.shard.weight[rows][row, col] = values.to(s.shard.weight.dtype)

    @staticmethod
    def _reset_optimizer_state(shard: MaskedShard, rows: slice, old: torch.Tensor,
                               new: torch.Tensor) -> None:
        """Zeroes per-weight optimizer state where the (packed) mask changes; per-row state
        (row-wise Adagrad) only for rows that had no active weight before, since it is shared
        with the row's other, unchanged weights."""
        revived_rows = (old == 0).all(1) & (new != 0).any(1)
        for state in shard.shard.optimizer_states():
            if state.numel() == shard.num_rows * shard.num_cols:
                zero_where_(state.view(shard.num_rows, shard.num_cols)[rows], old ^ new)
            elif state.numel() == shard.num_rows:
                state.view(-1)[rows].mul_((~revived_rows).view(torch.uint8))

    def local_active(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for s in self.shards:
            if self._offers(s):
                for rows in s.row_chunks(self.elements):
                    yield (s.table, *s.active_digest(rows))

    def state_tensors(self, shard: MaskedShard) -> tuple[torch.Tensor, ...]:
        return shard.bits, shard.dropped_bits, shard.growth

    def checkpoint_components(self) -> dict[str, Any]:
        return {"sparsity": self}

    def state_dict(self) -> dict[str, Any]:
        """Masks, drop history (as bool tensors) and growth statistics: one tensor per table
        and kind, sharded like the table (a ShardedTensor of this rank's shards at their global
        offsets; the full tensor for replicated tables), so that DCP saves each rank's part and
        reshards on load. The masks are unpacked for the checkpoint (a byte a weight while it
        is written or read); `load_state_dict` packs what DCP loaded into them."""
        state: dict[str, Any] = {}
        self._checkpoint_views = {}
        for table, shape in self.table_shapes.items():
            shards = [s for s in self.shards if s.table == table]
            for kind in MaskedShard.STATE:
                views = [s.growth if kind == "growth" else s.mask if kind == "mask"
                         else s.dropped_of(slice(None)) for s in shards]
                self._checkpoint_views.update({(id(s), kind): v for s, v in zip(shards, views)})
                if shards and shards[0].shard.replicated:
                    state[f"{table}.{kind}"] = views[0]
                    continue
                state[f"{table}.{kind}"] = sharded_state(
                    [(v, [s.shard.row_offset, s.shard.col_offset])
                     for s, v in zip(shards, views)], shape, self.ctx)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Packs the masks DCP loaded (into the tensors `state_dict()` returned, after the
        model's weights) and re-zeroes pruned weights."""
        for s in self.shards:
            s.bits = pack_bits(self._checkpoint_views[(id(s), "mask")])
            s.dropped_bits = pack_bits(self._checkpoint_views[(id(s), "ever_dropped")])
            s.apply_(elements=self.elements)
        self._checkpoint_views = {}
