"""LightGCN's graph side: the normalised adjacency, exact propagation and its gradient, the
propagation bags (exact, truncated, gathered) and their memory-mapped cache."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import write_clustered_dataset
from dsl_dist.data import DataError, Manifest, prepare_dataset
from dsl_dist.data import graph as graph_module
from dsl_dist.data.graph import (CSRBags, InteractionGraph, PropagationBags, load_propagation_bags,
                                 propagation_bags, read_graph)
from dsl_dist.model.lightgcn import propagate


def random_graph(num_users: int = 17, num_items: int = 11, edges: int = 45,
                 seed: int = 0) -> InteractionGraph:
    """Random edges among all but the last user and item, which stay isolated."""
    rng = np.random.default_rng(seed)
    return InteractionGraph(num_users, num_items, rng.integers(0, num_users - 1, edges),
                            rng.integers(0, num_items - 1, edges))


def dense_propagation(graph: InteractionGraph, num_layers: int) -> torch.Tensor:
    """P = Σ_k α_k Â^k in float64, Â built densely from the edges."""
    n, u = graph.num_nodes, graph.num_users
    a = torch.zeros(n, n, dtype=torch.float64)
    a[graph.users, u + graph.items] = 1
    a[u + graph.items, graph.users] = 1
    degree = a.sum(1)
    scale = torch.where(degree > 0, degree.rsqrt(), torch.zeros_like(degree))
    a_hat = scale[:, None] * a * scale[None, :]
    return sum(torch.linalg.matrix_power(a_hat, k)
               for k in range(num_layers + 1)) / (num_layers + 1)


def bag_sums(bags: CSRBags, table: torch.Tensor) -> torch.Tensor:
    """Each bag's weighted sum of table rows, pooled as the model pools them."""
    lengths, ids, weights = bags.gather(torch.arange(bags.num_rows))
    offsets = torch.cumsum(lengths.long(), 0) - lengths.long()
    return F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=weights)


def test_normalized_adjacency_by_hand() -> None:
    # user 0: items 0, 1 (edge (0, 0) twice); user 1: item 1; user 2 and item 2 isolated
    graph = InteractionGraph(3, 3, np.array([0, 0, 1, 0]), np.array([0, 1, 1, 0]))
    adjacency = graph.normalized_adjacency()
    assert adjacency.layout == torch.sparse_csr and adjacency.dtype == torch.float32
    expected = torch.zeros(6, 6)
    for user, item, weight in ((0, 0, 1 / np.sqrt(2 * 1)), (0, 1, 1 / np.sqrt(2 * 2)),
                               (1, 1, 1 / np.sqrt(1 * 2))):
        expected[user, 3 + item] = expected[3 + item, user] = weight
    torch.testing.assert_close(adjacency.to_dense(), expected)
    assert graph.num_nodes == 6


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_propagate_is_the_dense_sum_of_powers_and_passes_gradients(num_layers: int) -> None:
    graph = random_graph()
    p = dense_propagation(graph, num_layers)
    embeddings = torch.randn(graph.num_nodes, 5, requires_grad=True)
    out = propagate(graph.normalized_adjacency(), embeddings, num_layers)
    torch.testing.assert_close(out.double(), p @ embeddings.double(), rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    torch.testing.assert_close(embeddings.grad.double(), p.T @ upstream.double(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
@pytest.mark.parametrize("block_bytes", [None, 1])  # default blocks, and one node per block
def test_exact_bags_reproduce_propagation(num_layers: int, block_bytes: int | None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if block_bytes is not None:
        monkeypatch.setattr(graph_module, "BLOCK_BYTES", block_bytes)
    graph = random_graph(seed=num_layers)
    embeddings = torch.randn(graph.num_nodes, 4)
    expected = propagate(graph.normalized_adjacency(), embeddings, num_layers)
    bags = propagation_bags(graph, num_layers, max_neighbours=0)
    assert bags.self_weight == pytest.approx(1 / (num_layers + 1))
    users, items = embeddings[:graph.num_users], embeddings[graph.num_users:]
    got = bags.self_weight * embeddings + torch.cat([
        bag_sums(bags.user_to_users, users) + bag_sums(bags.user_to_items, items),
        bag_sums(bags.item_to_users, users) + bag_sums(bags.item_to_items, items)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if num_layers == 1:  # no even hops
        assert len(bags.user_to_users.ids) == len(bags.item_to_items.ids) == 0


@pytest.mark.parametrize("max_neighbours", [1, 3, 8])
def test_truncation_keeps_the_largest_weights_per_table(max_neighbours: int) -> None:
    graph = random_graph(num_users=30, num_items=20, edges=90)
    p = dense_propagation(graph, 3).numpy() - np.eye(graph.num_nodes) / 4  # P' = P - α_0 I
    bags = propagation_bags(graph, 3, max_neighbours)
    u = graph.num_users
    for name, rows, cols in (("user_to_users", slice(0, u), slice(0, u)),
                             ("user_to_items", slice(0, u), slice(u, None)),
                             ("item_to_users", slice(u, None), slice(0, u)),
                             ("item_to_items", slice(u, None), slice(u, None))):
        block = p[rows, cols]
        csr = getattr(bags, name)
        for row, weights in enumerate(block):
            ids = csr.ids[csr.indptr[row]:csr.indptr[row + 1]].numpy()
            kept = csr.weights[csr.indptr[row]:csr.indptr[row + 1]].numpy()
            nonzero = np.sort(weights[weights > 0])[::-1]
            assert len(ids) == min(max_neighbours, len(nonzero)) and len(set(ids)) == len(ids)
            np.testing.assert_allclose(kept, weights[ids], rtol=1e-5)  # each kept id's weight
            np.testing.assert_allclose(np.sort(kept)[::-1], nonzero[:len(ids)], rtol=1e-5)


def test_gather_concatenates_bags_of_any_rows() -> None:
    bags = CSRBags(torch.tensor([0, 2, 2, 5, 5, 6]), torch.tensor([4, 1, 0, 3, 2, 9]),
                   torch.tensor([0.5, 0.25, 1.0, 2.0, 3.0, 4.0]))
    rows = torch.tensor([2, 1, 2, 0, 3, 4, 0, 1])  # repeats and empty bags (1 and 3)
    lengths, ids, weights = bags.gather(rows)
    assert lengths.dtype == torch.int32 and ids.dtype == torch.int64
    assert lengths.tolist() == [3, 0, 3, 2, 0, 1, 2, 0]
    assert ids.tolist() == [0, 3, 2, 0, 3, 2, 4, 1, 9, 4, 1]
    assert weights.tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 0.5, 0.25, 4.0, 0.5, 0.25]
    empty = bags.gather(torch.tensor([], dtype=torch.int64))
    assert [len(t) for t in empty] == [0, 0, 0]
    assert bags.gather(torch.tensor([1, 3], dtype=torch.int32))[0].tolist() == [0, 0]


def test_gather_matches_a_loop_on_random_bags() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 6, (50,), generator=generator)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    bags = CSRBags(indptr, torch.randint(0, 1000, (int(indptr[-1]),), generator=generator),
                   torch.rand(int(indptr[-1]), generator=generator))
    rows = torch.randint(0, 50, (200,), generator=generator)
    got_lengths, ids, weights = bags.gather(rows)
    assert got_lengths.tolist() == lengths[rows].tolist()
    assert ids.tolist() == [i for r in rows.tolist() for i in bags.ids[indptr[r]:indptr[r + 1]]]
    assert torch.equal(weights, torch.cat([bags.weights[indptr[r]:indptr[r + 1]] for r in rows]))


def test_bad_arguments_name_themselves() -> None:
    graph = random_graph()
    bags = propagation_bags(graph, 2, 4)
    for rows in (torch.tensor([0, graph.num_users]), torch.tensor([-1])):
        with pytest.raises(ValueError, match="rows: row"):
            bags.user_to_items.gather(rows)
    with pytest.raises(ValueError, match="rows"):
        bags.user_to_items.gather(torch.tensor([0.0]))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_layers"):
            propagation_bags(graph, bad, 4)
        with pytest.raises(ValueError, match="num_layers"):
            propagate(graph.normalized_adjacency(), torch.zeros(graph.num_nodes, 2), bad)
    for bad in (-1, 2.0):
        with pytest.raises(ValueError, match="max_neighbours"):
            propagation_bags(graph, 2, bad)
    with pytest.raises(ValueError, match="adjacency"):
        propagate(graph.normalized_adjacency(), torch.zeros(graph.num_nodes + 1, 2), 2)
    with pytest.raises(ValueError, match="items: id 11"):
        InteractionGraph(2, 11, np.array([0]), np.array([11]))
    with pytest.raises(ValueError, match="indptr"):
        CSRBags(torch.tensor([0, 2, 1]), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="max_neighbours=2"):
        PropagationBags(2, 2, bags.user_to_users, bags.user_to_items, bags.item_to_users,
                        bags.item_to_items)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    source = write_clustered_dataset(tmp_path / "source")
    out = tmp_path / "ds"
    prepare_dataset({"train": source / "train.txt", "test": source / "test.txt"}, out,
                    name="c", num_shards=3, rows_per_group=50)
    return out


def train_pairs(dataset: Path) -> list[tuple[int, int]]:
    shards = Manifest.load(dataset).splits["train"].shards
    tables = [pq.read_table(dataset / s.path, columns=["user", "item"]) for s in shards]
    return [pair for t in tables for pair in zip(t["user"].to_pylist(), t["item"].to_pylist())]


def test_read_graph_streams_the_distinct_train_edges(dataset: Path, tmp_path: Path) -> None:
    graph = read_graph(dataset)
    manifest = Manifest.load(dataset)
    assert (graph.num_users, graph.num_items) == (manifest.num_users, manifest.num_items)
    assert graph.users.dtype == graph.items.dtype == np.int64
    assert sorted(zip(graph.users.tolist(), graph.items.tolist())) == sorted(train_pairs(dataset))

    (tmp_path / "train.csv").write_text("user,item\n0,5\n1,5\n0,5\n0,6\n")
    duplicated = tmp_path / "dup"
    prepare_dataset({"train": tmp_path / "train.csv"}, duplicated, name="dup")
    graph = read_graph(duplicated)
    assert list(zip(graph.users.tolist(), graph.items.tolist())) == [(0, 0), (0, 1), (1, 0)]

    shard = dataset / manifest.splits["train"].shards[0].path
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    with pytest.raises(DataError, match="corrupt shard"):
        read_graph(dataset)


def counting_builder(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[int]:
    """Counts (in the returned list) the bag computations of load_propagation_bags."""
    calls, build = [], graph_module.propagation_bags

    def counted(*args, **kwargs):
        calls.append(1)
        time.sleep(delay)
        return build(*args, **kwargs)
    monkeypatch.setattr(graph_module, "propagation_bags", counted)
    return calls


def is_mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's data lies in a memory mapping of `path` (Linux's /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < stop:
                return True
    return False


def same_bags(a: PropagationBags, b: PropagationBags) -> bool:
    return all(torch.equal(getattr(getattr(a, name), part), getattr(getattr(b, name), part))
               for name in graph_module.BAG_NAMES for part in ("indptr", "ids", "weights"))


def test_load_builds_the_cache_once_then_maps_it(dataset: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_builder(monkeypatch)
    first = load_propagation_bags(dataset, 2, 5)
    cache = dataset / "propagation-K2-M5"
    files = sorted(p.name for p in cache.iterdir())
    assert files == ["item_to_items.arrow", "item_to_users.arrow", "meta.json",
                     "user_to_items.arrow", "user_to_users.arrow"]
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    with monkeypatch.context() as patch:  # a current cache needs no lock (nor a writable dir)
        patch.setattr(graph_module, "_exclusive", None)
        again = load_propagation_bags(dataset, 2, 5)
    assert len(calls) == 1 and {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    assert same_bags(first, again) and same_bags(again, propagation_bags(read_graph(dataset), 2, 5))
    assert (again.num_layers, again.max_neighbours) == (2, 5)
    assert is_mapped_from(again.user_to_items.ids, cache / "user_to_items.arrow")

    exact = load_propagation_bags(dataset, 2, 0)  # another max_neighbours: another cache
    assert len(calls) == 2 and (dataset / "propagation-K2-M0").is_dir()
    assert len(exact.user_to_items.ids) > len(again.user_to_items.ids)
    assert not any(p.name.startswith(".propagation-K2-M0-") for p in dataset.iterdir())


def test_a_cache_from_other_train_shards_is_rebuilt(dataset: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    load_propagation_bags(dataset, 3, 4)
    source = write_clustered_dataset(tmp_path / "other-source", seed=1)
    other = tmp_path / "other"
    prepare_dataset({"train": source / "train.txt"}, other, name="c", num_shards=3,
                    rows_per_group=50)
    shutil.copytree(dataset / "propagation-K3-M4", other / "propagation-K3-M4")
    calls = counting_builder(monkeypatch)
    bags = load_propagation_bags(other, 3, 4)
    assert len(calls) == 1
    assert same_bags(bags, propagation_bags(read_graph(other), 3, 4))
    assert not same_bags(bags, load_propagation_bags(dataset, 3, 4))


def test_a_damaged_cache_raises_naming_it(dataset: Path) -> None:
    load_propagation_bags(dataset, 2, 3)
    cache = dataset / "propagation-K2-M3"
    arrow = cache / "item_to_users.arrow"
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(DataError, match="item_to_users.arrow: damaged propagation cache"):
        load_propagation_bags(dataset, 2, 3)
    (cache / "meta.json").unlink()
    with pytest.raises(DataError, match="propagation-K2-M3: not a complete propagation cache"):
        load_propagation_bags(dataset, 2, 3)


def test_the_cache_appears_only_complete(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    move = graph_module.move_into_place
    cache = dataset / "propagation-K2-M3"

    def check_then_move(staging: Path, target: Path) -> None:
        assert target == cache and not cache.exists()
        assert len(list(staging.iterdir())) == 5
        move(staging, target)
    monkeypatch.setattr(graph_module, "move_into_place", check_then_move)
    load_propagation_bags(dataset, 2, 3)
    assert cache.is_dir()

    def crash(staging: Path, target: Path) -> None:
        raise OSError("disk gone")
    monkeypatch.setattr(graph_module, "move_into_place", crash)
    with pytest.raises(OSError, match="disk gone"):
        load_propagation_bags(dataset, 2, 4)
    assert sorted(p.name for p in dataset.iterdir() if "propagation-" in p.name) == [
        ".propagation-K2-M3.lock", ".propagation-K2-M4.lock", "propagation-K2-M3"]


def test_concurrent_loads_build_once(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_builder(monkeypatch, delay=0.3)
    results: list[PropagationBags] = []
    threads = [threading.Thread(target=lambda: results.append(load_propagation_bags(dataset, 2, 3)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert all(same_bags(results[0], r) for r in results[1:])
