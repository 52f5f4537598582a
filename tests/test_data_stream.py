"""Per-rank streaming: disjoint equal parts that rotate, determinism, resume, batch layout,
reading only what a rank needs, and per-user evaluation rows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsl_dist.data import (DataError, InteractionStream, Manifest, UserHistoryStream,
                           history_batch, negative_feature_names, prepare_dataset,
                           read_user_items)

Pair = tuple[int, int]


@pytest.fixture
def dataset(clustered_source: Path, tmp_path: Path) -> Path:
    """1080 train rows in 3 shards of 360 rows, row groups of 40; 360 test rows."""
    out = tmp_path / "ds"
    prepare_dataset({"train": clustered_source / "train.txt", "test": clustered_source / "test.txt"},
                    out, name="c", num_shards=3, rows_per_group=40)
    return out


def stream(dataset: Path, rank: int, world_size: int, epoch: int = 0,
           **options: int) -> InteractionStream:
    s = InteractionStream(dataset, rank=rank, world_size=world_size,
                          **({"batch_size": 16, "num_negatives": 2, "seed": 3,
                              "shuffle_buffer": 50} | options))
    s.set_epoch(epoch)
    return s


def batch_pairs(batches: list) -> list[Pair]:
    return [p for b in batches for p in zip(b["user"].values().tolist(),
                                            b["item"].values().tolist())]


def split_pairs(dataset: Path, split: str) -> list[Pair]:
    """The split's rows in global order: its shards one after another."""
    shards = Manifest.load(dataset).splits[split].shards
    table = pa.concat_tables(pq.read_table(dataset / s.path) for s in shards)
    return list(zip(table["user"].to_pylist(), table["item"].to_pylist()))


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x.values(), y.values()) for x, y in zip(a, b))


@pytest.mark.parametrize("world", [2, 3, 7])
def test_ranks_read_disjoint_equal_contiguous_parts_that_rotate(dataset: Path,
                                                                world: int) -> None:
    rows = split_pairs(dataset, "train")
    size = len(rows) // world
    parts = [Counter(rows[k * size:(k + 1) * size]) for k in range(world)]
    seen = {}
    for epoch in (0, 1):
        for rank in range(world):  # batch_size 1: every row of the part comes out
            got = batch_pairs(list(stream(dataset, rank, world, epoch, batch_size=1)))
            assert len(got) == size
            seen[epoch, rank] = Counter(got)
        # Each rank's rows are one contiguous part, and the ranks' parts are all different,
        # so together they are exactly the used rows (the remainder rows stay unused).
        assert sorted(parts.index(seen[epoch, r]) for r in range(world)) == list(range(world))
    for rank in range(world):  # epoch e + 1 gives rank r what epoch e gave rank r + 1
        assert seen[1, rank] == seen[0, (rank + 1) % world]
    assert stream(dataset, 0, world).steps_per_epoch == size // 16


def test_same_seed_and_epoch_give_the_same_batches(dataset: Path) -> None:
    first = list(stream(dataset, 1, 2))
    assert len(first) == stream(dataset, 1, 2).steps_per_epoch == 540 // 16
    assert same_batches(first, list(stream(dataset, 1, 2)))
    assert not same_batches(first, list(stream(dataset, 1, 2, epoch=2)))  # same part, new order
    assert not same_batches(first, list(stream(dataset, 1, 2, seed=4)))
    again = stream(dataset, 1, 2)
    assert same_batches(list(again), list(again)), "each iteration is a whole epoch"


def test_rows_are_shuffled_beyond_row_groups(dataset: Path) -> None:
    rows = split_pairs(dataset, "train")
    first = batch_pairs(list(stream(dataset, 0, 1, batch_size=40, shuffle_buffer=200))[:1])
    groups_hit = {rows.index(p) // 40 for p in first}
    assert len(groups_hit) > 1, "a batch mixes rows of several row groups"


def test_resume_from_state_dict_yields_the_remaining_batches(dataset: Path) -> None:
    full = list(stream(dataset, 0, 2, epoch=1))
    interrupted = stream(dataset, 0, 2, epoch=1)
    iterator = iter(interrupted)
    for _ in range(5):
        next(iterator)
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches_done": 5, "world_size": 2}
    resumed = stream(dataset, 0, 2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a training loop sets the epoch again: the resume point stays
    assert same_batches(list(resumed), full[5:])
    assert resumed.state_dict() == {"epoch": 1, "batches_done": len(full), "world_size": 2}
    assert same_batches(list(resumed), full), "only the first iteration after loading resumes"
    resumed.set_epoch(2)
    assert resumed.state_dict() == {"epoch": 2, "batches_done": 0, "world_size": 2}


def test_a_state_of_another_world_size_goes_on_from_the_next_epoch(dataset: Path) -> None:
    """The batches depend on the world size, so a stream cannot keep the place of a state
    saved by another one: it starts the next epoch (or the same one, if none was taken)."""
    resumed = stream(dataset, 0, 1)
    resumed.load_state_dict({"epoch": 3, "batches_done": 5, "world_size": 2})
    assert resumed.state_dict() == {"epoch": 4, "batches_done": 0, "world_size": 1}
    assert same_batches(list(resumed), list(stream(dataset, 0, 1, epoch=4)))
    resumed.load_state_dict({"epoch": 3, "batches_done": 0, "world_size": 2})
    assert resumed.state_dict() == {"epoch": 3, "batches_done": 0, "world_size": 1}


def test_batch_layout(dataset: Path) -> None:
    manifest = Manifest.load(dataset)
    train = set(split_pairs(dataset, "train"))
    batches = list(stream(dataset, 1, 2, num_negatives=3))
    keys = ["user", "item", *negative_feature_names(3)]
    assert keys == ["user", "item", "neg_0", "neg_1", "neg_2"]
    negatives = []
    for batch in batches:
        assert batch.keys() == keys and batch.stride() == 16
        assert batch.lengths().tolist() == [1] * (16 * len(keys))
        assert batch.values().dtype == torch.int64
        for k, key in enumerate(keys):  # key-major: all users, then all items, ...
            assert torch.equal(batch[key].values(), batch.values()[k * 16:(k + 1) * 16])
        assert set(batch_pairs([batch])) <= train
        negatives += batch.values()[32:].tolist()
    # uniform over all items: with ~3000 draws over 60 items, every item shows up
    assert set(negatives) == set(range(manifest.num_items))


def test_steps_per_epoch_must_be_positive(dataset: Path) -> None:
    with pytest.raises(DataError, match="360 train rows per rank cannot fill one batch of 361"):
        stream(dataset, 0, 3, batch_size=361)
    with pytest.raises(ValueError, match="rank 3 is not in"):
        stream(dataset, 3, 3)


def test_a_rank_opens_only_the_shards_of_its_part(dataset: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def whole_file_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stream must read row group by row group")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_file_read)
    monkeypatch.setattr(pq, "read_table", whole_file_read)
    manifest = Manifest.load(dataset)
    last = dataset / manifest.splits["train"].shards[2].path
    data = bytearray(last.read_bytes())
    data[100] ^= 0x01
    last.write_bytes(bytes(data))
    assert len(list(stream(dataset, 0, 3))) == 360 // 16  # part 0 is shard 0: never opened
    with pytest.raises(DataError, match="train/part-00002.parquet: corrupt shard"):
        list(stream(dataset, 2, 3))
    with pytest.raises(DataError, match="train/part-00002.parquet: corrupt shard"):
        list(stream(dataset, 0, 3, epoch=2))  # epoch 2 moves rank 0 to part 2


def test_ids_outside_the_manifest_name_the_shard(dataset: Path) -> None:
    manifest = Manifest.load(dataset)
    path = dataset / manifest.splits["train"].shards[1].path
    table = pq.read_table(path)
    items = table["item"].to_numpy().copy()
    items[7] = manifest.num_items
    pq.write_table(table.set_column(1, "item", pa.array(items)), path, row_group_size=40)
    with pytest.raises(DataError, match=rf"part-00001.parquet: item id {manifest.num_items} "
                                        rf"outside \[0, {manifest.num_items}\)"):
        list(stream(dataset, 0, 1, verify_checksums=False))
    with pytest.raises(DataError, match="part-00001.parquet: corrupt shard"):
        list(stream(dataset, 0, 1))
    pq.write_table(table.slice(0, 100), path)
    with pytest.raises(DataError, match="part-00001.parquet: 100 rows, the manifest says 360"):
        list(stream(dataset, 0, 1, verify_checksums=False))


@pytest.mark.parametrize("split", ["train", "test"])
def test_user_items_partition_the_split(dataset: Path, split: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    expected = Counter(split_pairs(dataset, split))
    monkeypatch.setattr(pq, "read_table", None)  # streamed by row group, never read whole
    merged: Counter[Pair] = Counter()
    for rank in range(3):
        part = read_user_items(dataset, split, rank=rank, world_size=3)
        assert part.users.dtype == part.items.dtype == np.int64
        assert np.all(part.users % 3 == rank) and np.all(np.diff(part.users) > 0)
        assert part.indptr[0] == 0 and part.indptr[-1] == len(part.items)
        assert np.all(np.diff(part.indptr) > 0), "users without rows are absent"
        for k, user in enumerate(part.users):
            merged.update((int(user), int(i)) for i in part.items_of(k))
    assert merged == expected


def test_user_items_of_only_some_users(dataset: Path) -> None:
    whole = read_user_items(dataset, "train", rank=1, world_size=2)
    only = whole.users[::3]
    part = read_user_items(dataset, "train", rank=1, world_size=2, only=only)
    assert np.array_equal(part.users, only)
    for k, user in enumerate(part.users):
        assert np.array_equal(part.items_of(k),
                              whole.items_of(int(np.searchsorted(whole.users, user))))


def tiny_dataset(directory: Path, train: str, test: str) -> Path:
    """A prepared data set of LightGCN-format train and test lines."""
    (directory / "train.txt").write_text(train)
    (directory / "test.txt").write_text(test)
    prepare_dataset({"train": directory / "train.txt", "test": directory / "test.txt"},
                    directory / "ds", name="t")
    return directory / "ds"


def test_user_items_of_users_without_rows(tmp_path: Path) -> None:
    tiny_dataset(tmp_path, "0 1 2\n1 0\n2 2\n", "0 0\n2 1\n")
    rank1 = read_user_items(tmp_path / "ds", "test", rank=1, world_size=2)
    assert rank1.users.tolist() == [] and rank1.indptr.tolist() == [0]
    rank0 = read_user_items(tmp_path / "ds", "test", rank=0, world_size=2)
    assert rank0.users.tolist() == [0, 2]
    assert [rank0.items_of(k).tolist() for k in range(2)] == [[0], [1]]


def test_user_items_gather_handles_absent_users(tmp_path: Path) -> None:
    tiny_dataset(tmp_path, "0 1 2\n1 0\n3 2 0 1\n", "0 0\n")
    train = read_user_items(tmp_path / "ds", "train", rank=1, world_size=2)
    assert train.users.tolist() == [1]  # of the users 0, 1, 2 (raw 0, 1, 3)
    counts, items = train.gather(np.array([1, 2, 0, 1]))
    assert counts.tolist() == [1, 0, 0, 1]
    assert items.tolist() == train.items_of(0).tolist() * 2
    batch = history_batch(train, np.array([2, 1]))
    assert batch["user"].values().tolist() == [2, 1]
    assert batch["history"].lengths().tolist() == [0, 1]
    assert batch["history"].values().tolist() == train.items_of(0).tolist()
    everyone = read_user_items(tmp_path / "ds", "train", rank=0, world_size=1)
    counts, items = everyone.gather(np.array([2, 0]))
    assert counts.tolist() == [3, 2]
    assert items.tolist() == everyone.items_of(2).tolist() + everyone.items_of(0).tolist()


def histories(dataset: Path, rank: int, world_size: int, epoch: int = 0,
              batch_size: int = 7) -> UserHistoryStream:
    s = UserHistoryStream(dataset, rank=rank, world_size=world_size, batch_size=batch_size, seed=3)
    s.set_epoch(epoch)
    return s


def test_history_batches_hold_each_ranks_users_with_all_their_items(dataset: Path) -> None:
    train = Counter(split_pairs(dataset, "train"))
    for rank in range(2):
        s = histories(dataset, rank, 2)
        batches = list(s)
        assert len(batches) == s.steps_per_epoch == s.local_steps == 60 // 7
        seen: Counter[Pair] = Counter()
        for batch in batches:
            users, history = batch["user"].values(), batch["history"]
            assert len(users) == 7 and bool((users % 2 == rank).all())
            for user, items in zip(users.tolist(), history.to_dense()):
                seen.update((user, int(i)) for i in items)
        users = {u for u, _ in seen}
        assert len(users) == 7 * len(batches), "a user twice in an epoch"
        assert seen == Counter({p: c for p, c in train.items() if p[0] in users})


def test_history_batches_are_seeded_by_epoch_and_resume_mid_epoch(dataset: Path) -> None:
    first = list(histories(dataset, 1, 2, epoch=4))
    assert same_batches(first, list(histories(dataset, 1, 2, epoch=4)))
    assert not same_batches(first, list(histories(dataset, 1, 2, epoch=5)))
    s = histories(dataset, 1, 2, epoch=4)
    taken = [b for _, b in zip(range(3), s)]
    resumed = histories(dataset, 1, 2)
    resumed.load_state_dict(s.state_dict())
    assert s.state_dict() == {"epoch": 4, "batches_done": 3, "world_size": 2}
    assert same_batches(taken + list(resumed), first)
    limited = histories(dataset, 0, 2, epoch=4)
    limited.steps_per_epoch = 2  # as the trainer sets it: the smallest over the ranks
    assert len(list(limited)) == 2


def test_history_stream_refuses_a_batch_larger_than_a_ranks_users(dataset: Path) -> None:
    with pytest.raises(DataError, match="fewer than one batch of 61"):
        histories(dataset, 0, 2, batch_size=61)
