"""Data layer: interaction files → prepared Parquet shards (`prepare`) → per-rank streams.

The names below are imported on first use, so that `python -m dsl_dist.data.prepare` neither
imports the module twice nor waits for torch, which only the streams need.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "errors",
    "read_interactions": "formats",
    "Manifest": "manifest", "ShardInfo": "manifest", "SplitInfo": "manifest",
    "verify_shard": "manifest",
    "prepare_dataset": "prepare", "ensure_prepared": "prepare",
    "find_source_splits": "prepare", "split_interactions": "prepare",
    "InteractionStream": "stream", "UserHistoryStream": "stream", "UserItems": "stream",
    "read_user_items": "stream", "history_batch": "stream", "HISTORY_FEATURE": "stream",
    "USER_FEATURE": "stream", "ITEM_FEATURE": "stream", "negative_feature_names": "stream",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
