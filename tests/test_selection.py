"""Exact distributed top-k: against sort/topk references with many ties, across candidate splits
simulated in one process (ranks in lock-step threads), and across two real gloo ranks."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from dsl_dist.sparsity.selection.exact import local_counts, select_extreme

# A few distinct values, so that most selections straddle a tie; includes both zeros,
# infinities, subnormals and values whose float32 bit patterns differ in low bits only.
TIE_VALUES = torch.tensor([float("-inf"), -3e38, -1.5, -1.0000001, -1.0, -1e-45, -0.0, 0.0,
                           1e-45, 1.0, 1.0000001, 1.5, 3e38, float("inf")], dtype=torch.float32)


def tied_scores(n: int, generator: torch.Generator) -> torch.Tensor:
    return TIE_VALUES[torch.randint(len(TIE_VALUES), (n,), generator=generator)]


def unique_positions(n: int, generator: torch.Generator, bits: int = 62) -> torch.Tensor:
    """n distinct positions in [0, 2**bits), in random order."""
    if n <= (1 << bits) // 4:
        positions = torch.randint(1 << bits, (2 * n + 8,), generator=generator).unique()
        positions = positions[torch.randperm(len(positions), generator=generator)]
        if len(positions) >= n:
            return positions[:n]
    return torch.randperm(1 << bits, generator=generator)[:n]


def reference(scores: torch.Tensor, positions: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Brute force: sort by (score, position) with Python floats (-0.0 == 0.0 there)."""
    s, p = scores.tolist(), positions.tolist()
    sign = -1.0 if largest else 1.0
    order = sorted(range(len(s)), key=lambda i: (sign * s[i], p[i]))
    chosen = torch.zeros(len(s), dtype=torch.bool)
    chosen[order[:k]] = True
    return chosen


def assert_same_values_as_topk(scores: torch.Tensor, chosen: torch.Tensor, k: int,
                               largest: bool) -> None:
    """Whatever the tie-break, the chosen values are the multiset torch.topk finds."""
    expected = torch.topk(scores, k, largest=largest).values.sort().values
    assert torch.equal(scores[chosen].sort().values, expected)


def simulate_ranks(parts: list[tuple[torch.Tensor, ...]],
                   call: Callable[..., Any]) -> list[Any]:
    """Runs call(*part, reducer) for every part (scores, positions, ...) in its own thread;
    the reducers sum the parts' counts in lock-step, like an all_reduce, and insist that every
    "rank" reduces int64 tensors of the same shape at the same call. Returns each part's
    result, or the exception it raised."""
    world = len(parts)
    # A rank that raises while the others wait in a reduction leaves them to time out (and fail)
    # here; aborting the barrier instead would race with ranks legitimately raising together.
    barrier = threading.Barrier(world, timeout=10)
    slots: list[Any] = [None] * world
    results: list[Any] = [None] * world

    def reducer(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(counts: torch.Tensor) -> torch.Tensor:
            assert counts.dtype == torch.int64 and counts.dim() == 1
            slots[rank] = counts.clone()
            barrier.wait()
            shapes = {tuple(c.shape) for c in slots}
            assert len(shapes) == 1, f"ranks reduce different shapes {shapes}"
            total = torch.stack(slots).sum(0)
            barrier.wait()  # nobody overwrites its slot before all have summed
            return total
        return reduce

    def run(rank: int) -> None:
        try:
            results[rank] = call(*parts[rank], reducer(rank))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            results[rank] = error

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def select_split(scores: torch.Tensor, positions: torch.Tensor, k: int, largest: bool,
                 owner: torch.Tensor, world: int) -> torch.Tensor:
    """Selection with candidate i on simulated rank owner[i]; reassembled in global order."""
    index = [torch.nonzero(owner == r).flatten() for r in range(world)]
    results = simulate_ranks(
        [(scores[i], positions[i]) for i in index],
        lambda s, p, reduce: select_extreme(s, p, k, largest=largest, reduce_counts=reduce))
    for result in results:
        if isinstance(result, BaseException):
            raise result
    chosen = torch.zeros(len(scores), dtype=torch.bool)
    for i, part in zip(index, results):
        assert part.dtype == torch.bool and part.shape == i.shape
        chosen[i] = part
    return chosen


@pytest.mark.cuda
@pytest.mark.parametrize("largest", [True, False])
def test_matches_sorted_reference_with_ties(largest: bool, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(150):
        n = int(torch.randint(1, 300, (1,), generator=generator))
        scores = tied_scores(n, generator)
        bits = [62, 20, 9][trial % 3]
        positions = unique_positions(n, generator, bits)
        random_k = int(torch.randint(n + 1, (1,), generator=generator))
        for k in sorted({0, 1, n // 2, n - 1, n, random_k}):
            chosen = select_extreme(scores.to(device), positions.to(device), k,
                                    largest=largest, reduce_counts=local_counts)
            assert chosen.device == device
            chosen = chosen.cpu()
            assert chosen.dtype == torch.bool and chosen.shape == scores.shape
            assert int(chosen.sum()) == k
            assert torch.equal(chosen, reference(scores, positions, k, largest)), (trial, n, k)
            assert_same_values_as_topk(scores, chosen, k, largest)


@pytest.mark.parametrize("largest", [True, False])
def test_positions_computed_on_demand_choose_the_same_and_only_for_ties(largest: bool) -> None:
    generator = torch.Generator().manual_seed(7)
    for trial in range(60):
        n = int(torch.randint(1, 300, (1,), generator=generator))
        scores = tied_scores(n, generator)
        positions = unique_positions(n, generator, 20)
        asked: list[torch.Tensor] = []

        def positions_of(index: torch.Tensor) -> torch.Tensor:
            asked.append(index)
            return positions[index]

        for k in sorted({1, n // 2, n - 1}):
            asked.clear()
            lazy = select_extreme(scores, positions_of, k, largest=largest,
                                  reduce_counts=local_counts, position_bits=20)
            assert torch.equal(lazy, reference(scores, positions, k, largest)), (trial, n, k)
            for index in asked:  # only candidates tied at the threshold score
                assert len(set(scores[index].tolist())) == 1
                assert int((scores == scores[index[0]]).sum()) == len(index)


@pytest.mark.cuda
@pytest.mark.parametrize("largest", [True, False])
def test_matches_topk_on_distinct_values(largest: bool, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(1)
    scores = (torch.randn(100_000, generator=generator) * 10.0 ** torch.randint(
        -30, 30, (100_000,), generator=generator)).unique()  # distinct values, sorted
    scores = scores[torch.randperm(len(scores), generator=generator)]
    positions = unique_positions(len(scores), generator)
    for k in (1, 7, 12_345, len(scores) - 1):
        chosen = select_extreme(scores.to(device), positions.to(device), k, largest=largest,
                                reduce_counts=local_counts).cpu()
        expected = torch.zeros(len(scores), dtype=torch.bool)
        expected[torch.topk(scores, k, largest=largest).indices] = True
        assert torch.equal(chosen, expected)


@pytest.mark.parametrize("largest", [True, False])
def test_marked_candidates_choose_what_the_gathered_candidates_choose(largest: bool) -> None:
    """`candidates` excludes the other entries whatever their scores (NaN included), for
    signed scores and for magnitudes (non-negative: their own keys), on one and on several
    simulated ranks."""
    generator = torch.Generator().manual_seed(8)
    for trial in range(40):
        n = int(torch.randint(1, 3000, (1,), generator=generator))
        scores = tied_scores(n, generator)
        if trial % 2:
            scores = scores.abs()
        positions = unique_positions(n, generator, [62, 16][trial % 2])
        candidates = torch.rand(n, generator=generator) < [0.2, 0.5, 0.9, 1.0][trial % 4]
        scores[~candidates & (torch.rand(n, generator=generator) < 0.1)] = float("nan")
        count = int(candidates.sum())
        world = 1 + trial % 3
        owner = torch.randint(world, (n,), generator=generator)
        index = [torch.nonzero(owner == r).flatten() for r in range(world)]
        for k in sorted({0, 1, count // 3, count, int(torch.randint(count + 1, (1,),
                                                                    generator=generator))}):
            expected = torch.zeros(n, dtype=torch.bool)
            expected[candidates] = reference(scores[candidates], positions[candidates], k,
                                             largest)
            results = simulate_ranks(
                [(scores[i], positions[i], candidates[i]) for i in index],
                lambda s, p, c, reduce: select_extreme(s, p, k, largest=largest,
                                                       reduce_counts=reduce, candidates=c))
            chosen = torch.zeros(n, dtype=torch.bool)
            for i, part in zip(index, results):
                assert not isinstance(part, BaseException), part
                chosen[i] = part
            assert torch.equal(chosen, expected), (trial, n, k)


def test_positions_outside_the_candidates_are_not_checked_whether_gathered_or_marked() -> None:
    generator = torch.Generator().manual_seed(9)
    scores, positions = tied_scores(2000, generator), unique_positions(2000, generator, 20)
    for density in (0.2, 0.9):  # under half the entries: gathered; else marked
        candidates = torch.rand(2000, generator=generator) < density
        bad = positions.clone()
        bad[~candidates] = -1  # out of [0, 2**20), but not a candidate
        chosen = select_extreme(scores, bad, 100, largest=True, reduce_counts=local_counts,
                                position_bits=20, candidates=candidates)
        expected = torch.zeros(2000, dtype=torch.bool)
        expected[candidates] = reference(scores[candidates], positions[candidates], 100, True)
        assert torch.equal(chosen, expected), density
        with pytest.raises(ValueError, match="outside"):
            select_extreme(scores, bad, 100, largest=True, reduce_counts=local_counts,
                           position_bits=20)


def test_ties_go_to_the_smaller_position_for_largest_and_smallest() -> None:
    scores = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0])
    positions = torch.tensor([50, 40, 10, 30, 20])
    chosen = select_extreme(scores, positions, 2, largest=True, reduce_counts=local_counts)
    assert chosen.tolist() == [True, False, True, False, False]
    chosen = select_extreme(scores, positions, 3, largest=False, reduce_counts=local_counts)
    assert chosen.tolist() == [False, False, True, True, True]


def test_negative_zero_equals_positive_zero() -> None:
    scores = torch.tensor([0.0, -0.0, 0.0, -0.0])
    positions = torch.tensor([5, 3, 1, 7])
    for largest in (True, False):
        for k, expected in [(1, [2]), (2, [1, 2]), (3, [0, 1, 2])]:
            chosen = select_extreme(scores, positions, k, largest=largest,
                                    reduce_counts=local_counts)
            assert torch.nonzero(chosen).flatten().tolist() == expected, (largest, k)


@pytest.mark.cuda
def test_all_equal_scores_go_by_position(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(4)
    positions = unique_positions(5000, generator)
    for value in (0.0, -0.0, -2.5, float("inf")):
        scores = torch.full((5000,), value)
        for largest in (True, False):
            chosen = select_extreme(scores.to(device), positions.to(device), 1234,
                                    largest=largest, reduce_counts=local_counts).cpu()
            assert torch.equal(chosen, positions <= positions.sort().values[1233])


def test_strided_inputs() -> None:
    generator = torch.Generator().manual_seed(6)
    scores, positions = tied_scores(4000, generator), unique_positions(4000, generator)
    chosen = select_extreme(scores[::2], positions[::2], 700, largest=False,
                            reduce_counts=local_counts)
    assert torch.equal(chosen, reference(scores[::2], positions[::2], 700, False))


@pytest.mark.cuda
def test_half_precision_scores_and_int32_positions(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(5)
    scores = tied_scores(500, generator)
    positions = torch.randperm(500, generator=generator)
    for dtype in (torch.float16, torch.bfloat16):
        narrow = scores.to(dtype)
        chosen = select_extreme(narrow.to(device), positions.to(device, torch.int32), 100,
                                largest=True, reduce_counts=local_counts).cpu()
        assert torch.equal(chosen, reference(narrow.float(), positions, 100, True))


def test_reduces_only_a_bounded_number_of_small_count_vectors() -> None:
    generator = torch.Generator().manual_seed(2)
    calls: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def recording(counts: torch.Tensor) -> torch.Tensor:
        calls.append((counts.dtype, tuple(counts.shape)))
        return counts

    n = 200_000
    scores, positions = tied_scores(n, generator), unique_positions(n, generator)
    for largest in (True, False):
        for k in (0, 1, 5_000, n // 2, n):
            calls.clear()
            select_extreme(scores, positions, k, largest=largest, reduce_counts=recording)
            assert calls[0] == (torch.int64, (66,))
            assert all(c == (torch.int64, (65536,)) for c in calls[1:])
            assert len(calls) <= 7
            if k in (0, n):
                assert len(calls) == 1
    # distinct scores need no position rounds: 1 + at most 2
    calls.clear()
    select_extreme(torch.randn(n, generator=generator), positions, 777, largest=True,
                   reduce_counts=recording)
    assert 2 <= len(calls) <= 3
    # small positions need fewer position rounds than 62-bit ones
    calls.clear()
    select_extreme(scores, torch.randperm(n, generator=generator), 5_000, largest=True,
                   reduce_counts=recording)
    assert len(calls) <= 1 + 2 + 2  # 200_000 < 2**18: 2 digits


@pytest.mark.parametrize("largest", [True, False])
def test_any_split_over_simulated_ranks_chooses_what_one_rank_chooses(largest: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    for trial in range(24):
        n = int(torch.randint(1, 3000, (1,), generator=generator))
        world = 2 + trial % 3
        scores = tied_scores(n, generator)
        positions = unique_positions(n, generator, [62, 16][trial % 2])
        owner = torch.randint(world, (n,), generator=generator)
        if trial % 4 == 0:
            owner[owner == world - 1] = 0  # one rank without any candidate
        elif trial % 4 == 1:
            owner = torch.arange(n) * world // n  # contiguous blocks
        for k in sorted({0, 1, n // 3, n, int(torch.randint(n + 1, (1,), generator=generator))}):
            single = select_extreme(scores, positions, k, largest=largest,
                                    reduce_counts=local_counts)
            split = select_split(scores, positions, k, largest, owner, world)
            assert torch.equal(split, single), (trial, world, n, k)
            assert torch.equal(single, reference(scores, positions, k, largest))


def test_errors_are_raised_on_every_simulated_rank() -> None:
    scores, positions = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2])
    parts = [(scores[:2], positions[:2]), (scores[2:], positions[2:]),
             (scores[:0], positions[:0])]

    def run(k: int, parts: list) -> list[Any]:
        return simulate_ranks(parts, lambda s, p, reduce: select_extreme(
            s, p, k, largest=True, reduce_counts=reduce))

    for result in run(4, parts):  # even the rank that holds no candidate
        assert isinstance(result, ValueError) and "k=4 exceeds the 3 candidate" in str(result)
    nan_parts = [parts[0], (torch.tensor([float("nan")]), positions[2:]), parts[2]]
    for result in run(1, nan_parts):
        assert isinstance(result, ValueError) and "1 NaN" in str(result)
    duplicate = [parts[0], (torch.tensor([2.0]), torch.tensor([1])), parts[2]]
    for result in run(1, duplicate):  # two candidates (2.0, position 1) straddle the threshold
        assert isinstance(result, ValueError) and "unique" in str(result)
    assert [r.tolist() for r in run(3, parts)] == [[True, True], [True], []]


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="k=4 exceeds the 3 candidate"):
        select_extreme(torch.ones(3), torch.arange(3), 4, largest=True, reduce_counts=local_counts)
    with pytest.raises(ValueError, match="k=1 exceeds the 0 candidate"):
        select_extreme(torch.ones(0), torch.arange(0), 1, largest=False,
                       reduce_counts=local_counts)
    with pytest.raises(ValueError, match="k=-1"):
        select_extreme(torch.ones(3), torch.arange(3), -1, largest=True, reduce_counts=local_counts)
    with pytest.raises(ValueError, match="NaN"):
        select_extreme(torch.tensor([1.0, float("nan")]), torch.arange(2), 1, largest=True,
                       reduce_counts=local_counts)
    with pytest.raises(ValueError, match="NaN"):  # even when k == 0
        select_extreme(torch.tensor([float("nan")]), torch.arange(1), 0, largest=False,
                       reduce_counts=local_counts)
    with pytest.raises(ValueError, match=r"outside \[0, 2\*\*4\)"):
        select_extreme(torch.ones(2), torch.tensor([3, 16]), 1, largest=True,
                       reduce_counts=local_counts, position_bits=4)
    with pytest.raises(ValueError, match="outside"):
        select_extreme(torch.ones(2), torch.tensor([-1, 0]), 1, largest=True,
                       reduce_counts=local_counts)
    with pytest.raises(ValueError, match="1-D"):
        select_extreme(torch.ones(3), torch.arange(2), 1, largest=True, reduce_counts=local_counts)
    with pytest.raises(TypeError, match="float32"):
        select_extreme(torch.ones(3, dtype=torch.float64), torch.arange(3), 1, largest=True,
                       reduce_counts=local_counts)
    empty = select_extreme(torch.ones(0), torch.arange(0), 0, largest=True,
                           reduce_counts=local_counts)
    assert empty.dtype == torch.bool and empty.shape == (0,)


def test_uniform_hash_is_a_function_of_position() -> None:
    from dsl_dist.sparsity.selection.hashing import uniform_hash  # the initial masks' scores

    positions = torch.arange(100_000)
    values = uniform_hash(positions, seed=3)
    assert torch.equal(values[5000:6000], uniform_hash(positions[5000:6000], seed=3))
    assert not torch.equal(values, uniform_hash(positions, seed=4))
    assert 0 <= float(values.min()) and float(values.max()) < 1
    assert abs(float(values.mean()) - 0.5) < 0.01


# ---- two real ranks -------------------------------------------------------------------------

REAL_N = 20_000
REAL_CASES = [(True, 1), (True, 7_777), (False, 12_345), (False, REAL_N - 1), (True, 0)]


def _real_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return tied_scores(REAL_N, generator), unique_positions(REAL_N, generator)


def _real_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from dsl_dist.distributed import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        scores, positions = _real_data()
        mine = torch.arange(rank, REAL_N, world)  # interleaved split of the same candidates
        reduce = DistContext(rank, world, torch.device("cpu"), "gloo",
                             dist.group.WORLD).all_reduce_sum
        result: dict[str, Any] = {}
        for largest, k in REAL_CASES:
            chosen = select_extreme(scores[mine], positions[mine], k, largest=largest,
                                    reduce_counts=reduce)
            result[f"{largest}/{k}"] = mine[chosen].tolist()
        # refusals found from reduced counts reach every rank, and the group stays usable
        for name, bad_scores, k in [("too_many", scores[mine], REAL_N + 1),
                                    ("nan", scores[mine].clone().fill_(float("nan"))
                                     if rank == 1 else scores[mine], 1)]:
            try:
                select_extreme(bad_scores, positions[mine], k, largest=True, reduce_counts=reduce)
                result[name] = "no error"
            except ValueError as error:
                result[name] = str(error)
        dist.barrier()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_real_ranks_choose_what_one_process_chooses(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_real_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    scores, positions = _real_data()
    for largest, k in REAL_CASES:
        expected = select_extreme(scores, positions, k, largest=largest,
                                  reduce_counts=local_counts)
        assert torch.equal(expected, reference(scores, positions, k, largest))
        first, second = (r[f"{largest}/{k}"] for r in per_rank)
        assert all(i % 2 == 0 for i in first) and all(i % 2 == 1 for i in second)
        assert sorted(first + second) == torch.nonzero(expected).flatten().tolist()
    for r in per_rank:
        assert f"k={REAL_N + 1} exceeds the {REAL_N} candidate" in r["too_many"]
        assert f"{REAL_N // 2} NaN" in r["nan"]
