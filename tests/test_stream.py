"""Per-rank streaming: disjoint equal parts, determinism, resume, batch layout, eval rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsl_dist.data import DataError, InteractionStream, Manifest, read_user_items
from dsl_dist.data.prepare import prepare_dataset


@pytest.fixture
def dataset(clustered_source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    prepare_dataset({"train": clustered_source / "train.txt", "test": clustered_source / "test.txt"},
                    out, name="c", num_shards=3, rows_per_group=40)
    return out


def stream(dataset: Path, rank: int, world_size: int, **kw) -> InteractionStream:
    options = dict(batch_size=16, num_negatives=2, seed=3, shuffle_buffer=50) | kw
    return InteractionStream(dataset, rank=rank, world_size=world_size, **options)


def pairs(batches: list) -> list[tuple[int, int]]:
    return [pair for b in batches for pair in zip(b["user"].values().tolist(),
                                                  b["item"].values().tolist())]


def all_train_pairs(dataset: Path) -> list[tuple[int, int]]:
    manifest = Manifest.load(dataset)
    table = pa.concat_tables(pq.read_table(dataset / s.path)
                             for s in manifest.splits["train"].shards)
    return list(zip(table["user"].to_pylist(), table["item"].to_pylist()))


def test_ranks_read_disjoint_equal_parts_that_rotate(dataset: Path) -> None:
    rows = all_train_pairs(dataset)
    world = 3
    for epoch in (0, 1):
        streams = [stream(dataset, r, world, batch_size=1, shuffle_buffer=7) for r in range(world)]
        for s in streams:
            s.set_epoch(epoch)
        parts = [s.part() for s in streams]
        assert sorted(parts) == [(k * (len(rows) // world), (k + 1) * (len(rows) // world))
                                 for k in range(world)]
        seen = [pairs(list(s)) for s in streams]
        for (start, stop), got in zip(parts, seen):
            assert sorted(got) == sorted(rows[start:stop])
        assert len({len(s) for s in seen}) == 1
    assert stream(dataset, 0, world).part() != parts[0]  # epoch 1 moved rank 0 to another part


def test_same_seed_and_epoch_give_the_same_batches(dataset: Path) -> None:
    first, second = list(stream(dataset, 1, 2)), list(stream(dataset, 1, 2))
    assert len(first) == stream(dataset, 1, 2).steps_per_epoch
    for a, b in zip(first, second):
        assert torch.equal(a.values(), b.values())
    other_epoch = stream(dataset, 1, 2)
    other_epoch.set_epoch(1)
    assert not all(torch.equal(a.values(), b.values()) for a, b in zip(first, other_epoch))
    other_seed = list(stream(dataset, 1, 2, seed=4))
    assert not all(torch.equal(a.values(), b.values()) for a, b in zip(first, other_seed))


def test_resume_from_state_dict_yields_the_remaining_batches(dataset: Path) -> None:
    full = list(stream(dataset, 0, 2))
    interrupted = stream(dataset, 0, 2)
    iterator = iter(interrupted)
    for _ in range(2):
        next(iterator)
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "batches_done": 2}
    resumed = stream(dataset, 0, 2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest):
        assert torch.equal(a.values(), b.values())


def test_batch_layout(dataset: Path) -> None:
    manifest = Manifest.load(dataset)
    batch = next(iter(stream(dataset, 0, 2)))
    assert batch.keys() == ["user", "item", "neg_0", "neg_1"]
    assert batch.stride() == 16 and torch.all(batch.lengths() == 1)
    assert batch["user"].values().max() < manifest.num_users
    for key in ("item", "neg_0", "neg_1"):
        values = batch[key].values()
        assert values.dtype == torch.int64 and 0 <= values.min() and values.max() < manifest.num_items


def test_too_few_rows_for_a_batch(dataset: Path) -> None:
    with pytest.raises(DataError, match="lower data.batch_size"):
        stream(dataset, 0, 2, batch_size=10_000)


def test_corrupt_shard_and_out_of_range_id(dataset: Path) -> None:
    manifest = Manifest.load(dataset)
    shard = dataset / manifest.splits["train"].shards[0].path
    pq.write_table(pa.table({"user": [0], "item": [manifest.num_items]}), shard)
    with pytest.raises(DataError, match="corrupt shard"):
        list(stream(dataset, 0, 1))
    with pytest.raises(DataError, match=rf"item id {manifest.num_items} outside \[0, "):
        list(stream(dataset, 0, 1, verify_checksums=False, batch_size=1))


def test_user_items_partition_the_split(dataset: Path) -> None:
    manifest = Manifest.load(dataset)
    test = pq.read_table(dataset / manifest.splits["test"].shards[0].path)
    for s in manifest.splits["test"].shards[1:]:
        test = pa.concat_tables([test, pq.read_table(dataset / s.path)])
    expected: dict[int, list[int]] = {}
    for u, i in zip(test["user"].to_pylist(), test["item"].to_pylist()):
        expected.setdefault(u, []).append(i)
    merged = {}
    for rank in range(2):
        part = read_user_items(dataset, "test", rank=rank, world_size=2)
        assert np.all(part.users % 2 == rank) and np.all(np.diff(part.users) > 0)
        merged.update({int(u): sorted(part.items_of(k).tolist()) for k, u in enumerate(part.users)})
    assert merged == {u: sorted(items) for u, items in expected.items()}
