"""The shared readers of run directories (dsl_dist/report/runs.py) and the served-ranking
metrics (dsl_dist/report/served.py) that benchmarks and tests use instead of parsing inline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dsl_dist.data.stream import UserItems
from dsl_dist.report.runs import ReportError, last_event, read_events
from dsl_dist.report.served import metrics_at


def write_events(directory: Path, events: list[dict]) -> None:
    (directory / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_last_event_is_the_latest_of_its_kind(tmp_path: Path) -> None:
    events = [{"event": "update", "budget": 7}, {"event": "eval", "recall@20": 0.1},
              {"event": "update", "budget": 9}, {"event": "epoch", "step": 3}]
    write_events(tmp_path, events)
    assert read_events(tmp_path) == events
    assert last_event(tmp_path, "update")["budget"] == 9
    assert last_event(tmp_path, "eval")["recall@20"] == 0.1


def test_missing_run_or_event_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        read_events(tmp_path)
    write_events(tmp_path, [{"event": "epoch", "step": 1}])
    with pytest.raises(ReportError, match="no 'eval' event"):
        last_event(tmp_path, "eval")


def test_metrics_at_matches_a_hand_computed_ranking() -> None:
    test = UserItems(users=np.array([0, 1]), indptr=np.array([0, 2, 3]),
                     items=np.array([5, 6, 2]))
    # user 0: hits at ranks 1 and 3 of 2 relevant; user 1: no hit
    got = metrics_at([[5, 1, 6], [0, 1, 3]], test, 3)
    ideal = 1 + 1 / math.log2(3)
    assert got["recall@3"] == pytest.approx(0.5)
    assert got["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / ideal / 2)
    with pytest.raises(ValueError, match="repeats"):
        metrics_at([[5, 5], [0]], test, 3)
