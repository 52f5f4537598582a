"""Data layer: interaction files → prepared Arrow shards → per-rank streams."""

from dsl_dist.data.errors import DataError
from dsl_dist.data.manifest import Manifest
from dsl_dist.data.prepare import ensure_prepared, prepare_dataset
from dsl_dist.data.stream import InteractionStream, UserItems, read_user_items

__all__ = ["DataError", "InteractionStream", "Manifest", "UserItems", "ensure_prepared",
           "prepare_dataset", "read_user_items"]
