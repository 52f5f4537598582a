"""`dsl-dist serve ARTIFACT --port 8000`: top-K recommendations over HTTP, on Ray Serve.

Routes (JSON in and out):

- `POST /recommend {"users": [...], "k": 20, "exclude_train": true}` → `{"k": 20,
  "recommendations": [{"user": u, "items": [...], "scores": [...]}, ...]}`, users and items by
  their original ids, items best first (exact full ranking, see dsl_dist/serving/inference.py);
- `GET /healthz` → `{"status": "ok", "model": ..., "users": ..., "items": ...}`.

Requests are batched with Ray Serve's batching (`@serve.batch`): the users of concurrent
requests are scored together, one matrix product for all of them. A bad request (malformed
JSON, no user list, an unknown user, k < 1 or above the number of items, more than
`max_users` users) gets a 4xx whose `error` names the problem; the replica keeps serving.

The service binds 127.0.0.1 unless `--host` says otherwise. `serve run
dsl_dist.serving.serve:app path=ARTIFACT` runs the same application under Ray Serve's own CLI.
The Python API without HTTP is `load` (re-exported here from dsl_dist.serving.inference).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from dsl_dist.serving.artifact import ArtifactError, read_artifact
from dsl_dist.serving.inference import ExportedModel, UnknownUsers, load

__all__ = ["BadRequest", "Query", "Recommender", "app", "build_app", "load", "main",
           "parse_query"]

MAX_USERS = 1024
"""Users in one request, at most (by default)."""


class BadRequest(ValueError):
    """A request that cannot be served, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    """A parsed request: original user ids, their indices, k, whether to exclude training
    items."""

    user_ids: list
    users: np.ndarray
    k: int
    exclude_train: bool


def parse_query(body: bytes, model: ExportedModel, max_users: int) -> Query:
    """The Query of a /recommend body, or BadRequest naming what is wrong with it."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"malformed JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("users"), list):
        raise BadRequest(400, 'the body must be a JSON object with a list "users"')
    unknown_keys = sorted(set(request) - {"users", "k", "exclude_train"})
    if unknown_keys:
        raise BadRequest(400, f"unknown field(s) {unknown_keys}; expected users, k, "
                              "exclude_train")
    user_ids = request["users"]
    if not user_ids:
        raise BadRequest(400, '"users" is empty')
    if len(user_ids) > max_users:
        raise BadRequest(413, f"{len(user_ids)} users in one request; at most {max_users}")
    exclude = request.get("exclude_train", True)
    if not isinstance(exclude, bool):
        raise BadRequest(400, f"exclude_train={exclude!r}: must be true or false")
    try:
        k = model.check_k(request.get("k", 20))
        users = model.users_of(user_ids)
    except UnknownUsers as exc:
        raise BadRequest(404, str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise BadRequest(400, str(exc)) from None
    return Query(user_ids, users, k, exclude)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Recommender:
    """One replica: the artifact loaded once, requests scored in batches."""

    def __init__(self, path: str, max_users: int = MAX_USERS, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005) -> None:
        self.model = load(path)
        self.max_users = max_users
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def health(self) -> dict[str, Any]:
        meta = self.model.meta
        return {"status": "ok", "model": meta["model"]["name"],
                "sparsity": meta["sparsity"]["name"], "users": self.model.num_users,
                "items": self.model.num_items}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def score_batch(self, queries: list[Query]) -> list[dict[str, Any]]:
        """The answers of concurrent queries, scored together (per exclude_train value)."""
        answers: list[Optional[dict[str, Any]]] = [None] * len(queries)
        for exclude in (True, False):
            group = [i for i, q in enumerate(queries) if q.exclude_train == exclude]
            if not group:
                continue
            k = max(queries[i].k for i in group)
            users = np.concatenate([queries[i].users for i in group])
            scores, items = self.model.top_items(users, k, exclude)
            start = 0
            for i in group:
                q = queries[i]
                rows = slice(start, start + len(q.users))
                answers[i] = {"k": q.k, "recommendations": [
                    self._answer(user, s[:q.k], t[:q.k])
                    for user, s, t in zip(q.user_ids, scores[rows], items[rows])]}
                start += len(q.users)
        return answers  # type: ignore[return-value]

    def _answer(self, user: Any, scores: Any, items: Any) -> dict[str, Any]:
        keep = scores.isfinite()
        ids = self.model.item_ids
        return {"user": user, "items": [ids[i] for i in items[keep].tolist()],
                "scores": scores[keep].tolist()}

    async def __call__(self, request: Request) -> JSONResponse:
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if route == "healthz" and request.method == "GET":
            return JSONResponse(self.health())
        if route != "recommend":
            return JSONResponse({"error": f"no route {request.url.path!r}; POST /recommend, "
                                          "GET /healthz"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": f"{request.method} /recommend: use POST"},
                                status_code=405)
        try:
            query = parse_query(await request.body(), self.model, self.max_users)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse(await self.score_batch(query))


def build_app(path: str | Path, *, replicas: int = 1, max_users: int = MAX_USERS,
              max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005) -> Application:
    """The Serve application of the artifact at `path` (its checksums checked here first)."""
    read_artifact(Path(path))
    return Recommender.options(num_replicas=replicas).bind(
        str(Path(path).resolve()), max_users, max_batch_size, batch_wait_timeout_s)


def app(args: dict[str, str]) -> Application:
    """For `serve run dsl_dist.serving.serve:app path=ARTIFACT [replicas=N max_users=N ...]`."""
    return build_app(args["path"], replicas=int(args.get("replicas", 1)),
                     max_users=int(args.get("max_users", MAX_USERS)),
                     max_batch_size=int(args.get("max_batch_size", 32)),
                     batch_wait_timeout_s=float(args.get("batch_wait_timeout_s", 0.005)))


def _check_free(host: str, port: int) -> None:
    """Refuses (OSError) a port another process listens on, before Ray starts: Ray Serve's
    proxy would otherwise fail in its own process with a screenful of tracebacks."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); "
                          "choose another --port") from None


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="dsl-dist serve", description=__doc__.split("\n")[0])
    parser.add_argument("artifact", type=Path, help="a directory written by dsl-dist export")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-users", type=int, default=MAX_USERS,
                        help="users in one request, at most")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="requests Ray Serve batches together, at most")
    parser.add_argument("--address", help="a Ray cluster to join (default: start one here)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        application = build_app(args.artifact, replicas=args.replicas, max_users=args.max_users,
                                max_batch_size=args.max_batch_size)
        _check_free(args.host, args.port)
    except (ArtifactError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    ray.init(address=args.address or "local", include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="dsl-dist", route_prefix="/")
    print(f"serving {args.artifact} on http://{args.host}:{args.port} "
          "(POST /recommend, GET /healthz); Ctrl-C or SIGTERM stops", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ray replaces Python's SIGINT handler
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("stopping", flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
