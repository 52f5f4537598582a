"""The chunked selection chooses what the in-memory one chooses, for any chunking, candidate
split across simulated ranks, and number of ties (held or streamed)."""

from __future__ import annotations

from typing import Iterator, Optional

import pytest
import torch

from dsl_dist.sparsity import streaming
from dsl_dist.sparsity.selection import local_counts, select_extreme
from dsl_dist.sparsity.streaming import Chunk, select_streaming
from test_selection import simulate_ranks, tied_scores, unique_positions


class Chunked:
    """Candidates held whole, visited in chunks of `size`."""

    def __init__(self, scores: torch.Tensor, positions: torch.Tensor,
                 candidates: Optional[torch.Tensor], size: int) -> None:
        self.scores, self.positions, self.candidates, self.size = (scores, positions,
                                                                   candidates, size)

    def chunks(self) -> Iterator[Chunk]:
        for start in range(0, len(self.scores), self.size):
            stop = start + self.size
            yield Chunk(start, self.scores[start:stop],
                        None if self.candidates is None else self.candidates[start:stop])

    def tie_keys(self, flat: torch.Tensor) -> torch.Tensor:
        return self.positions[flat]

    def chosen(self, selection: streaming.Selection) -> torch.Tensor:
        parts = [selection.chosen(c, self.tie_keys) for c in self.chunks()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool,
                                                          device=self.scores.device)


@pytest.mark.cuda
@pytest.mark.parametrize("held", [True, False])
def test_streaming_chooses_what_select_extreme_chooses(held: bool, device: torch.device,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "TIES_HELD", 1 << 21 if held else 0)
    generator = torch.Generator().manual_seed(3)
    for trial in range(16):
        n = int(torch.randint(1, 300, (1,), generator=generator))
        scores = tied_scores(n, generator)
        positions = unique_positions(n, generator, [62, 20, 9][trial % 3])
        candidates = None if trial % 2 else torch.rand(n, generator=generator) < 0.6
        total = n if candidates is None else int(candidates.sum())
        size = int(torch.randint(1, 64, (1,), generator=generator))
        for largest in (True, False):
            for k in sorted({0, 1, total // 2, total,
                             int(torch.randint(total + 1, (1,), generator=generator))}):
                expected = select_extreme(scores, positions, k, largest=largest,
                                          reduce_counts=local_counts, candidates=candidates)
                source = Chunked(scores.to(device), positions.to(device),
                                 None if candidates is None else candidates.to(device), size)
                selection = select_streaming(source, k, largest=largest,
                                             reduce_counts=local_counts, position_bits=62)
                assert torch.equal(source.chosen(selection).cpu(), expected), (trial, largest, k)


def test_ranks_choose_together_what_one_chooses() -> None:
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
            source = Chunked(s, p, c, 97)
            return source.chosen(select_streaming(source, k, largest=largest,
                                                  reduce_counts=reduce, position_bits=62))

        results = simulate_ranks([(scores[i], positions[i], candidates[i]) for i in index], rank)
        chosen = torch.zeros(n, dtype=torch.bool)
        for i, part in zip(index, results):
            assert not isinstance(part, BaseException), part
            chosen[i] = part
        assert torch.equal(chosen, expected) and int(chosen.sum()) == k


def test_bad_requests_are_refused() -> None:
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
