"""Top-K recommendations from an exported artifact, in one process: `load(path).recommend(...)`.

Scoring is exact: a user's score of every item is the dot product of their final embeddings,
and the top K come from a full ranking (items scored a block at a time with a running top K),
with the user's training items excluded as in the run's evaluation. MF's final embeddings
are its tables. LightGCN's are propagated with the run's own propagation (`bags`: the
truncated propagation bags the run trained and evaluated with; `full`: the exact sum of powers
of the normalised adjacency): at export time by default, from the data set's cached bags, and
stored in the artifact (`propagated.safetensors`); for an artifact exported without them, here
at load time, from the layer-0 tables and the training graph the artifact keeps (its
positives), with the same code on the same edges (computing bags takes minutes on a large
graph).

Example::

    model = load("exported/my-run")
    recs = model.recommend(["u17", "u42"], k=20)
    recs.items[0], recs.scores[0]  # user u17's 20 items (original ids), best first
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dsl_dist.data.graph import InteractionGraph
from dsl_dist.serving.artifact import Artifact, decode, read_artifact
from dsl_dist.serving.models import serving_module

ITEM_BLOCK = 1 << 16
"""Items scored at once (at most)."""


class UnknownUsers(KeyError):
    """Users the artifact does not know (`users` holds them)."""

    def __init__(self, users: list) -> None:
        super().__init__(f"unknown user id(s) {users[:10]}" + (" ..." if len(users) > 10 else ""))
        self.users = users

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Recommendations:
    """For each requested user (original ids, in request order), its items (original ids)
    and their scores, best first; fewer than k where the user's training items leave fewer."""

    users: list
    items: list[list]
    scores: list[list[float]]


class ApproximateIndex:
    """A FAISS HNSW graph over the item embeddings (inner product), for catalogues too large
    to score whole: a search visits about `ef_search` candidates per user, not every item."""

    def __init__(self, items: torch.Tensor, neighbours: int = 32, ef_search: int = 256) -> None:
        import faiss  # optional: only this index needs it

        self.index = faiss.IndexHNSWFlat(items.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efSearch = ef_search
        self.index.add(items.numpy())

    def search(self, side: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, items) of the (about) k best items of each row of `side`; missing ones
        score -inf."""
        scores, items = self.index.search(side.numpy(), k)
        scores, items = torch.from_numpy(scores), torch.from_numpy(items)
        return scores.masked_fill(items < 0, -torch.inf), items.clamp(min=0)


class ExportedModel:
    """An artifact ready to score: the final user and item embeddings, the training positives
    to exclude and the id maps; with `approximate`, a FAISS index ranks instead of the exact
    full ranking."""

    def __init__(self, artifact: Artifact, approximate: bool = False) -> None:
        meta = artifact.meta["model"]
        self.meta = artifact.meta
        self.num_users, self.num_items = meta["num_users"], meta["num_items"]
        self.indptr = artifact.positives[0].astype(np.int64)
        self.positives = artifact.positives[1].astype(np.int64)
        self.user_ids, self.item_ids = artifact.ids["users"], artifact.ids["items"]
        self._user_index = {raw: index for index, raw in enumerate(self.user_ids)}
        users, items = (torch.from_numpy(decode(artifact.tables[t])) for t in ("user", "item"))
        if artifact.propagated is not None:
            users, items = (torch.from_numpy(artifact.propagated[t]) for t in ("user", "item"))
        else:
            graph = InteractionGraph(self.num_users, self.num_items,
                                     np.repeat(np.arange(self.num_users), np.diff(self.indptr)),
                                     self.positives)
            final = serving_module(meta["name"]).final_embeddings(users, items, graph, meta, None)
            users, items = final if final is not None else (users, items)
        self.user_vectors, self.item_vectors = users.contiguous(), items.contiguous()
        self.index = ApproximateIndex(self.item_vectors) if approximate else None

    def users_of(self, user_ids: Sequence) -> np.ndarray:
        """The artifact's indices of original user ids (UnknownUsers names those it lacks)."""
        index = [self._user_index.get(u) for u in user_ids]
        unknown = [u for u, i in zip(user_ids, index) if i is None]
        if unknown:
            raise UnknownUsers(unknown)
        return np.asarray(index, dtype=np.int64)

    def check_k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not \
                1 <= k <= self.num_items:
            raise ValueError(f"k={k!r}: must be an integer in [1, {self.num_items}] (the items)")
        return int(k)

    @torch.no_grad()
    def top_items(self, users: np.ndarray, k: int, exclude_train: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, items) (len(users), k) of the users (indices), best first; excluded items
        score -inf."""
        side = self.user_vectors[torch.from_numpy(users)]
        counts = self.indptr[users + 1] - self.indptr[users]
        rows = torch.from_numpy(np.repeat(np.arange(len(users)), counts))
        excluded = torch.from_numpy(np.concatenate(
            [self.positives[self.indptr[u]:self.indptr[u + 1]] for u in users])
            if exclude_train and len(users) else np.empty(0, np.int64))
        rows = rows if exclude_train else rows[:0]
        if self.index is not None:
            return self._approximate(side, rows, excluded, k)
        top_scores = torch.full((len(users), 0), -torch.inf)
        top_items = torch.zeros((len(users), 0), dtype=torch.int64)
        for start in range(0, self.num_items, ITEM_BLOCK):
            stop = min(start + ITEM_BLOCK, self.num_items)
            scores = side @ self.item_vectors[start:stop].T
            here = (excluded >= start) & (excluded < stop)
            scores[rows[here], excluded[here] - start] = -torch.inf
            merged = torch.cat([top_scores, scores], 1)
            candidates = torch.cat([top_items,
                                    torch.arange(start, stop).expand(len(users), -1)], 1)
            top_scores, where = merged.topk(min(k, merged.shape[1]), dim=1)
            top_items = candidates.gather(1, where)
        return top_scores, top_items

    def _approximate(self, side: torch.Tensor, rows: torch.Tensor, excluded: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The index's top k + (most excluded items of a user), the excluded ones dropped."""
        most = int(torch.bincount(rows, minlength=len(side)).max()) if len(rows) else 0
        scores, items = self.index.search(side, min(k + most, self.num_items))
        keys = (torch.arange(len(side))[:, None] * self.num_items + items).numpy()
        seen = np.isin(keys, (rows * self.num_items + excluded).numpy())
        scores = scores.masked_fill(torch.from_numpy(seen), -torch.inf)
        top_scores, where = scores.topk(k, dim=1)
        return top_scores, items.gather(1, where)

    def recommend(self, user_ids: Sequence, k: int = 20,
                  exclude_train: bool = True) -> Recommendations:
        """The top `k` items of each of `user_ids` (original ids), best first."""
        k = self.check_k(k)
        users = self.users_of(list(user_ids))
        scores, items = self.top_items(users, k, exclude_train)
        keep = torch.isfinite(scores)
        return Recommendations(
            list(user_ids),
            [[self.item_ids[i] for i in row[ok].tolist()] for row, ok in zip(items, keep)],
            [row[ok].tolist() for row, ok in zip(scores, keep)])


def load(path: str | Path, approximate: bool = False) -> ExportedModel:
    """The artifact at `path` (checked against its checksums), ready to recommend; with
    `approximate`, through a FAISS index (`faiss-cpu`) instead of exact full ranking."""
    return ExportedModel(read_artifact(Path(path)), approximate)
