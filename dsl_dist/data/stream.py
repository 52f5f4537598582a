"""Per-rank streaming of prepared shards: training batches and per-user evaluation rows.

No rank reads the whole data set: pair training reads one contiguous part of the
(pre-shuffled) train rows, a row group at a time; history training and evaluation keep only
the rows of the rank's users.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec import KeyedJaggedTensor

from dsl_dist.data.errors import DataError
from dsl_dist.data.manifest import Manifest, ShardInfo, verify_shard

USER_FEATURE = "user"
ITEM_FEATURE = "item"
HISTORY_FEATURE = "history"


def negative_feature_names(num_negatives: int) -> list[str]:
    return [f"neg_{i}" for i in range(num_negatives)]


@dataclass(frozen=True)
class RowGroup:
    """Rows [start, stop) of row group `index` of `shard` (offsets within the row group)."""

    shard: ShardInfo
    index: int
    start: int
    stop: int


class ShardReader:
    """Reads row groups of a data set's shards, checking checksums and id ranges once."""

    def __init__(self, dataset_dir: Path, manifest: Manifest, verify_checksums: bool) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.manifest = manifest
        self.verify_checksums = verify_checksums
        self._files: dict[str, pq.ParquetFile] = {}

    def file(self, shard: ShardInfo) -> pq.ParquetFile:
        if shard.path not in self._files:
            path = self.dataset_dir / shard.path
            if self.verify_checksums:
                verify_shard(self.dataset_dir, shard)
            try:
                parquet = pq.ParquetFile(path)
            except Exception as exc:  # pyarrow raises several types for unreadable files
                raise DataError(f"{path}: unreadable shard ({exc})") from None
            if parquet.metadata.num_rows != shard.rows:  # row offsets would be wrong
                raise DataError(f"{path}: {parquet.metadata.num_rows} rows, the manifest says "
                                f"{shard.rows}")
            self._files[shard.path] = parquet
        return self._files[shard.path]

    def read(self, group: RowGroup) -> tuple[np.ndarray, np.ndarray]:
        table = self.file(group.shard).read_row_group(group.index, columns=["user", "item"])
        users = table["user"].to_numpy()[group.start:group.stop]
        items = table["item"].to_numpy()[group.start:group.stop]
        for name, ids, count in (("user", users, self.manifest.num_users),
                                 ("item", items, self.manifest.num_items)):
            if len(ids) and (ids.min() < 0 or ids.max() >= count):
                raise DataError(f"{self.dataset_dir / group.shard.path}: {name} id "
                                f"{int(ids.max() if ids.max() >= count else ids.min())} outside "
                                f"[0, {count}) of the manifest")
        return users, items

    def row_groups(self, split: str, start: int = 0, stop: int | None = None) -> list[RowGroup]:
        """The row groups (trimmed) covering global rows [start, stop) of a split."""
        info = self.manifest.split(split)
        stop = info.rows if stop is None else stop
        groups, offset = [], 0
        for shard in info.shards:
            if offset < stop and offset + shard.rows > start:
                metadata = self.file(shard).metadata
                for index in range(metadata.num_row_groups):
                    rows = metadata.row_group(index).num_rows
                    lo, hi = max(start - offset, 0), min(stop - offset, rows)
                    if lo < hi:
                        groups.append(RowGroup(shard, index, lo, hi))
                    offset += rows
            else:
                offset += shard.rows
        return groups


class EpochStream:
    """Epochs of batches that every rank cuts alike, resumable within an epoch.

    Each iteration is one pass over the epoch set by `set_epoch`; after `load_state_dict`, the
    next one starts after the batches that the saved state had already taken. A state saved
    with another world size cannot keep its place (the batches depend on the world size): the
    stream goes on from the start of the next epoch. Subclasses set `steps_per_epoch` and
    yield from `_batches(skip)`, which must not yield the first `skip` batches of the epoch.
    """

    steps_per_epoch: int

    def __init__(self, rank: int, world_size: int) -> None:
        _check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.batches_done = 0
        self._resume_at = 0  # batches the next iteration skips

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch of the next iteration; setting the epoch of a loaded state again
        keeps its resume point, so that a training loop can call this unconditionally."""
        if epoch != self.epoch:
            self.epoch, self.batches_done, self._resume_at = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if state.get("world_size", self.world_size) != self.world_size:
            epoch, done = epoch + bool(done), 0
        self.epoch, self.batches_done = epoch, done
        self._resume_at = self.batches_done

    def __iter__(self) -> Iterator[KeyedJaggedTensor]:
        skip, self._resume_at, self.batches_done = self._resume_at, 0, self._resume_at
        for batch in self._batches(skip):
            self.batches_done += 1
            yield batch

    def _batches(self, skip: int) -> Iterator[KeyedJaggedTensor]:
        raise NotImplementedError


class InteractionStream(EpochStream):
    """One rank's (user, positive, negatives) training batches as KeyedJaggedTensors.

    The train rows are cut into `world_size` equal contiguous parts; in epoch e rank r reads
    part (r + e) % world_size, so every rank sees different rows each epoch and every rank makes
    exactly `steps_per_epoch` steps. Row groups are visited in a seeded order and mixed through a
    shuffle buffer; negatives are uniform over items. (seed, epoch, rank, world_size) fix the
    batches. Each batch has keys [user, item, neg_0, ...], one id per sample and key.
    """

    def __init__(self, dataset_dir: Path, *, rank: int, world_size: int, batch_size: int,
                 num_negatives: int = 1, seed: int = 0, shuffle_buffer: int = 65536,
                 verify_checksums: bool = True) -> None:
        super().__init__(rank, world_size)
        self.manifest = Manifest.load(dataset_dir)
        self.reader = ShardReader(dataset_dir, self.manifest, verify_checksums)
        self.batch_size, self.num_negatives = batch_size, num_negatives
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.keys = [USER_FEATURE, ITEM_FEATURE, *negative_feature_names(num_negatives)]
        self.part_rows = self.manifest.split("train").rows // world_size
        self.steps_per_epoch = self.part_rows // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{dataset_dir}: {self.part_rows} train rows per rank cannot fill one "
                            f"batch of {batch_size}; lower data.batch_size")

    def part(self) -> tuple[int, int]:
        """This rank's global train rows [start, stop) in the current epoch."""
        part = (self.rank + self.epoch) % self.world_size
        return part * self.part_rows, (part + 1) * self.part_rows

    def _positives(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(users, items) of full batches: row groups in a random order through the buffer."""
        groups = self.reader.row_groups("train", *self.part())
        users, items, held = [], [], 0
        for k, position in enumerate(rng.permutation(len(groups))):
            u, i = self.reader.read(groups[position])
            users.append(u)
            items.append(i)
            held += len(u)
            if held < self.shuffle_buffer and k < len(groups) - 1:
                continue
            all_users, all_items = np.concatenate(users), np.concatenate(items)
            order = rng.permutation(held)
            full = held // self.batch_size * self.batch_size
            for start in range(0, full, self.batch_size):
                chosen = order[start:start + self.batch_size]
                yield all_users[chosen], all_items[chosen]
            users, items = [all_users[order[full:]]], [all_items[order[full:]]]
            held -= full

    def _batches(self, skip: int) -> Iterator[KeyedJaggedTensor]:
        shuffle_seed, negatives_seed = np.random.SeedSequence(
            [self.seed, self.epoch, self.rank, self.world_size]).spawn(2)
        generator = torch.Generator().manual_seed(
            int(negatives_seed.generate_state(1, np.uint64)[0]))
        positives = self._positives(np.random.default_rng(shuffle_seed))
        lengths = torch.ones(len(self.keys) * self.batch_size, dtype=torch.int32)
        for step, (users, items) in enumerate(positives):  # steps_per_epoch batches
            negatives = torch.randint(self.manifest.num_items,
                                      (self.num_negatives, self.batch_size), generator=generator)
            if step < skip:  # replay the random streams up to where the saved state was
                continue
            values = torch.cat([torch.from_numpy(users), torch.from_numpy(items),
                                negatives.flatten()])
            yield KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=values,
                                                      lengths=lengths)


@dataclass(frozen=True)
class UserItems:
    """Items per user in CSR form: users[k] (sorted) has items[indptr[k]:indptr[k + 1]]."""

    users: np.ndarray
    indptr: np.ndarray
    items: np.ndarray

    def items_of(self, k: int) -> np.ndarray:
        return self.items[self.indptr[k]:self.indptr[k + 1]]

    def gather(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(counts, items): how many items each of `users` has (0 for users absent here) and
        all those items, user after user."""
        if not len(self.users):
            return np.zeros(len(users), np.int64), np.empty(0, np.int64)
        k = np.searchsorted(self.users, users).clip(max=len(self.users) - 1)
        found = self.users[k] == users
        starts = self.indptr[k]
        counts = np.where(found, self.indptr[k + 1] - starts, 0)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return counts, self.items[np.repeat(starts, counts) + within]


def read_user_items(dataset_dir: Path, split: str, *, rank: int, world_size: int,
                    verify_checksums: bool = True,
                    only: Optional[np.ndarray] = None) -> UserItems:
    """The interactions of users with user % world_size == rank (of those in `only`, when
    given), streamed and filtered."""
    manifest = Manifest.load(dataset_dir)
    reader = ShardReader(dataset_dir, manifest, verify_checksums)
    users, items = [], []
    for group in reader.row_groups(split):
        u, i = reader.read(group)
        keep = u % world_size == rank
        if only is not None:
            keep &= np.isin(u, only)
        users.append(u[keep])
        items.append(i[keep])
    all_users = np.concatenate(users) if users else np.empty(0, np.int64)
    all_items = np.concatenate(items) if items else np.empty(0, np.int64)
    order = np.lexsort((all_items, all_users))
    all_users, all_items = all_users[order], all_items[order]
    unique, starts = np.unique(all_users, return_index=True)
    return UserItems(unique, np.r_[starts, len(all_users)].astype(np.int64), all_items)


def history_batch(source: UserItems, users: np.ndarray) -> KeyedJaggedTensor:
    """KJT with keys [user, history]: each of `users` and its items in `source` (none for a
    user absent from it)."""
    counts, items = source.gather(users)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[USER_FEATURE, HISTORY_FEATURE],
        values=torch.from_numpy(np.concatenate([users, items]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([np.ones(len(users)), counts]).astype(np.int32)))


class UserHistoryStream(EpochStream):
    """One rank's batches of users with all their train items (KJT keys user, history), for
    models that encode a user from the items they interacted with.

    Rank r holds the users with user % world_size == r that have train items; each epoch they
    are shuffled by (seed, epoch, rank, world_size) and cut into batches of `batch_size`
    users. Ranks hold different numbers of users, so `local_steps` may differ between them: the
    trainer sets `steps_per_epoch` to the smallest, which every rank then makes.
    """

    def __init__(self, dataset_dir: Path, *, rank: int, world_size: int, batch_size: int,
                 seed: int = 0, verify_checksums: bool = True) -> None:
        super().__init__(rank, world_size)
        self.histories = read_user_items(dataset_dir, "train", rank=rank, world_size=world_size,
                                         verify_checksums=verify_checksums)
        self.batch_size, self.seed = batch_size, seed
        self.local_steps = len(self.histories.users) // batch_size
        if self.local_steps == 0:
            raise DataError(f"{dataset_dir}: rank {rank} of {world_size} holds "
                            f"{len(self.histories.users)} users with train items, fewer than one "
                            f"batch of {batch_size}; lower data.batch_size")
        self.steps_per_epoch = self.local_steps

    def _batches(self, skip: int) -> Iterator[KeyedJaggedTensor]:
        order = np.random.default_rng(np.random.SeedSequence(
            [self.seed, self.epoch, self.rank, self.world_size])).permutation(len(self.histories.users))
        for step in range(skip, self.steps_per_epoch):
            rows = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield history_batch(self.histories, self.histories.users[rows])


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
