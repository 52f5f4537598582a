"""The chunked selection chooses what the in-memory one chooses, for any chunking, candidate
split across simulated ranks, and number of ties (held or streamed)."""

from __future__ import annotations

from typing import Iterator, Optional

import pytest
import torch

from dsl_dist.sparsity.selection import streaming
from dsl_dist.sparsity.selection.exact import local_counts, select_extreme
from dsl_dist.sparsity.selection.fastops import pack_bits, unpack_bits
from dsl_dist.sparsity.selection.hashing import POSITION_SCRAMBLE
from dsl_dist.sparsity.selection.streaming import Chunk, select_streaming
from test_selection import simulate_ranks, tied_scores, unique_positions


class Chunked:
    """Candidates held whole, laid out in rows of `cols` entries (the last row padded with
    entries that take no part) and visited `rows` rows a chunk."""

    def __init__(self, scores: torch.Tensor, positions: torch.Tensor,
                 candidates: Optional[torch.Tensor], rows: int, cols: int = 1,
                 absolute: bool = False, layout: Optional[tuple[int, int]] = None) -> None:
        """`positions`: the entries' tie keys; `layout` (first, stride): they are those of
        global positions first + row * stride + col (laid_out_tie_keys), which the chunks
        then say."""
        self.n, self.rows, self.cols, self.absolute = len(scores), rows, cols, absolute
        self.layout = layout
        pad = -self.n % cols
        if pad and candidates is None:
            candidates = torch.ones(self.n, dtype=torch.bool, device=scores.device)
        self.scores = torch.nn.functional.pad(scores, (0, pad)).view(-1, cols)
        self.positions = positions
        self.candidates = None if candidates is None else pack_bits(
            torch.nn.functional.pad(candidates, (0, pad)).view(-1, cols))

    def chunks(self) -> Iterator[Chunk]:
        for start in range(0, len(self.scores), self.rows):
            rows = slice(start, start + self.rows)
            yield Chunk(start * self.cols, self.scores[rows],
                        None if self.candidates is None else self.candidates[rows],
                        self.absolute, None if self.layout is None else
                        (self.layout[0] + start * self.layout[1], self.layout[1]))

    def tie_keys(self, flat: torch.Tensor) -> torch.Tensor:
        return self.positions[flat]

    def chosen(self, selection: streaming.Selection) -> torch.Tensor:
        parts = [unpack_bits(selection.chosen(c, self.tie_keys), self.cols).reshape(-1)
                 for c in self.chunks()]
        chosen = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool,
                                                            device=self.scores.device)
        return chosen[:self.n]


def laid_out_tie_keys(n: int, cols: int, layout: tuple[int, int],
                      position_bits: int) -> torch.Tensor:
    """ShardCandidates' tie keys of n entries in rows of `cols` at positions first + row *
    stride + col: the low position_bits bits of position * POSITION_SCRAMBLE."""
    flat = torch.arange(n)
    positions = layout[0] + flat // cols * layout[1] + flat % cols
    return (positions * POSITION_SCRAMBLE) & ((1 << position_bits) - 1)


@pytest.fixture(params=[True, False], ids=["fused", "torch"])
def fused(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both implementations of the passes over a chunk (only torch's off the CPU)."""
    monkeypatch.setattr(streaming, "FUSED", request.param)
    return request.param


@pytest.mark.cuda
@pytest.mark.parametrize("laid_out", [False, True], ids=["given", "laid_out"])
@pytest.mark.parametrize("held", [True, False])
def test_streaming_chooses_what_select_extreme_chooses(held: bool, laid_out: bool, fused: bool,
                                                       device: torch.device,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "TIE_MEMORY", 32 << 20 if held else 0)
    generator = torch.Generator().manual_seed(3)
    for trial in range(24):
        n = int(torch.randint(1, 300, (1,), generator=generator))
        scores = tied_scores(n, generator)
        if trial % 4 == 3:  # the growth statistic's dtype
            scores = scores.bfloat16()
        absolute = trial % 3 == 1  # magnitudes read from the weights themselves
        position_bits = [62, 20, 9][trial % 3]  # tie keys held as int64 or int32
        candidates = None if trial % 2 else torch.rand(n, generator=generator) < 0.6
        total = n if candidates is None else int(candidates.sum())
        cols = [1, 3, 8, 11][trial % 4]
        layout = None
        if laid_out:  # tie keys of positions the compiled passes compute themselves
            position_bits = max(position_bits, 12)
            layout = (int(torch.randint(100, (1,), generator=generator)), cols + trial % 3)
            positions = laid_out_tie_keys(n, cols, layout, position_bits)
        else:
            positions = unique_positions(n, generator, position_bits)
        rows = int(torch.randint(1, 64, (1,), generator=generator))
        for largest in (True, False):
            for k in sorted({0, 1, total // 2, total,
                             int(torch.randint(total + 1, (1,), generator=generator))}):
                expected = select_extreme(scores.abs() if absolute else scores, positions, k,
                                          largest=largest, reduce_counts=local_counts,
                                          candidates=candidates)
                source = Chunked(scores.to(device), positions.to(device),
                                 None if candidates is None else candidates.to(device),
                                 rows, cols, absolute, layout)
                selection = select_streaming(
                    source, k, largest=largest, reduce_counts=local_counts,
                    position_bits=position_bits,
                    score_bits=16 if scores.dtype == torch.bfloat16 else 32)
                assert torch.equal(source.chosen(selection).cpu(), expected), (trial, largest, k)


def test_ranks_choose_together_what_one_chooses(fused: bool) -> None:
    generator = torch.Generator().manual_seed(4)
    n, world = 2000, 3
    scores, positions = tied_scores(n, generator), unique_positions(n, generator)
    candidates = torch.rand(n, generator=generator) < 0.7
    owner = torch.randint(world, (n,), generator=generator)
    index = [torch.nonzero(owner == r).flatten() for r in range(world)]
    total = int(candidates.sum())
    for largest, k in ((True, 1), (False, total // 2), (True, total - 1)):
        expected = select_extreme(scores, positions, k, largest=largest,
                                  reduce_counts=local_counts, candidates=candidates)

        def rank(s: torch.Tensor, p: torch.Tensor, c: torch.Tensor, reduce) -> torch.Tensor:
            source = Chunked(s, p, c, 13, 8)
            return source.chosen(select_streaming(source, k, largest=largest,
                                                  reduce_counts=reduce, position_bits=62))

        results = simulate_ranks([(scores[i], positions[i], candidates[i]) for i in index], rank)
        chosen = torch.zeros(n, dtype=torch.bool)
        for i, part in zip(index, results):
            assert not isinstance(part, BaseException), part
            chosen[i] = part
        assert torch.equal(chosen, expected) and int(chosen.sum()) == k


def test_bad_requests_are_refused(fused: bool) -> None:
    source = Chunked(torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]), None, 1)
    with pytest.raises(ValueError, match="NaN"):
        select_streaming(source, 1, largest=True, reduce_counts=local_counts, position_bits=4)
    source = Chunked(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), None, 1)
    with pytest.raises(ValueError, match="exceeds the 2 candidate"):
        select_streaming(source, 3, largest=True, reduce_counts=local_counts, position_bits=4)
    duplicate = Chunked(torch.tensor([1.0, 1.0]), torch.tensor([5, 5]), None, 1)
    with pytest.raises(ValueError, match="unique"):
        select_streaming(duplicate, 1, largest=True, reduce_counts=local_counts,
                         position_bits=4)
