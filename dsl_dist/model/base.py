"""What every recommender offers the trainer and the evaluation.

A model is a plain `nn.Module` built on the `meta` device: `DistributedModelParallel` shards
its embedding tables (TorchRec `EmbeddingBagCollection`s) from outside and replicates the rest,
so nothing in a model knows about ranks. It offers three things:

- `forward(batch)`: the training loss of one rank's batch (called through the DMP wrapper, so
  that DDP synchronises the dense layers' gradients), as `host_batch` built it from the
  stream's batch on the host;
- `item_side(device, chunk)`: whatever scoring needs about all items, computed once per
  evaluation;
- `user_side(items, users, history)`: whatever scoring needs about some users;
- `score(items, users, start, stop)`: those users' scores against items [start, stop).

`item_side` and `user_side` look embeddings up through the sharded tables, which are
collectives: every rank calls them equally often (the evaluation sees to it); `score` is local.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.distributed.types import LazyAwaitable

PAIRS = "pairs"
"""Batches of (user, positive item, negative items): KJT keys user, item, neg_0, ..."""
HISTORIES = "histories"
"""Batches of users with all their train items: KJT keys user (one id), history (a bag)."""


class Recommender(nn.Module):
    """Base of the models (see the module docstring)."""

    batches: ClassVar[str] = PAIRS
    """Which stream feeds the model: PAIRS or HISTORIES."""
    fx_traceable: bool = False
    """Whether torch.fx can trace `forward` (TorchRec's TrainPipelineSparseDist traces it to
    start the next batch's input distribution early: train.pipeline)."""

    def forward(self, batch: KeyedJaggedTensor) -> torch.Tensor:
        raise NotImplementedError

    def host_batch(self, batch: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """A stream's batch as `forward` takes it, built on the host where the data is read
        (before the copy to the device), so that the step itself reads nothing back."""
        return batch

    def item_side(self, device: torch.device, chunk: int) -> Any:
        raise NotImplementedError

    def user_side(self, items: Any, users: torch.Tensor, history: KeyedJaggedTensor) -> Any:
        """What scoring needs about `users`; `history` holds each user's train items (key
        `history`), for models that encode users from them."""
        raise NotImplementedError

    def score(self, items: Any, users: Any, start: int, stop: int) -> torch.Tensor:
        """(users, stop - start) scores of the users (a `user_side`) against items
        [start, stop)."""
        raise NotImplementedError


def feature_batch(keys: list[str], stride: int,
                  parts: dict[str, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
                  weighted: bool = False) -> KeyedJaggedTensor:
    """A KJT with every one of `keys` (as sharded collections expect) and `stride` bags per key:
    `parts[key]` = (lengths, ids, weights or None) for the keys that have ids, empty bags for
    the others. `weighted`: per-id weights for every key (1.0 where none are given)."""
    device = next((ids.device for _, ids, _ in parts.values()), torch.device("cpu"))
    lengths, values, weights = [], [], []
    for key in keys:
        if key in parts:
            part_lengths, ids, part_weights = parts[key]
            lengths.append(part_lengths.to(device=device, dtype=torch.int32))
            values.append(ids.to(torch.int64))
            if weighted:
                weights.append(torch.ones(len(ids), device=device) if part_weights is None
                               else part_weights.to(torch.float32))
        else:
            lengths.append(torch.zeros(stride, dtype=torch.int32, device=device))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64,
                                                                       device=device),
        lengths=torch.cat(lengths), weights=torch.cat(weights) if weighted and weights else
        (torch.empty(0, device=device) if weighted else None))


def ones(n: int, device: torch.device) -> torch.Tensor:
    """Bag lengths of n single-id bags."""
    return torch.ones(n, dtype=torch.int32, device=device)


def collection_keys(collection: EmbeddingBagCollection) -> list[str]:
    """The feature names of a collection, in its tables' order."""
    return [f for table in collection.embedding_bag_configs() for f in table.feature_names]


def rows_in_chunks(count: int, chunk: int, device: torch.device,
                   rows_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """rows_of(ids) for ids [0, count), `chunk` ids at a time, written into one tensor (a
    torch.cat of the chunks would hold them all and the result at once: twice the memory)."""
    ids = torch.arange(count, device=device)
    if not count:
        return rows_of(ids)
    out: Optional[torch.Tensor] = None
    for start in range(0, count, chunk):
        rows = rows_of(ids[start:start + chunk])
        if out is None:
            out = rows.new_empty((count, *rows.shape[1:]))
        out[start:start + len(rows)] = rows
    return out


def lookup(collection: nn.Module, keys: list[str], feature: str, ids: torch.Tensor,
           weighted: bool = False) -> torch.Tensor:
    """Embeddings (len(ids), dim) of single-id bags of `ids` under `feature`, waited for
    (a sharded collection answers with an awaitable)."""
    batch = feature_batch(keys, len(ids), {feature: (ones(len(ids), ids.device), ids, None)},
                          weighted)
    embeddings = collection(batch)[feature]
    return embeddings.wait() if isinstance(embeddings, LazyAwaitable) else embeddings
