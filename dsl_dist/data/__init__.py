"""Data layer: interaction files → prepared Arrow shards (`prepare`) → per-rank streams."""

from dsl_dist.data.errors import DataError
from dsl_dist.data.manifest import Manifest
from dsl_dist.data.stream import InteractionStream, UserItems, read_user_items

__all__ = ["DataError", "InteractionStream", "Manifest", "UserItems", "read_user_items"]
