"""The HTTP service (dsl_dist/serving/serve.py): a real Ray Serve application on 127.0.0.1, one
route per exported lastfm run (conftest.EXPORT_RUNS). Its top-20 reproduces each run's
evaluation, concurrent requests are answered as sequential ones are, and bad requests get a 4xx
naming the problem while the service keeps serving. Ray runs in this process, on its own
temporary directory, and is shut down after the module."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

pytest.importorskip("ray", reason="Ray Serve is optional; absent from bare GPU images")
pytest.importorskip("safetensors", reason="the export format; absent from bare GPU images")
from conftest import EXPORT_RUNS  # noqa: E402
from dsl_dist.report.runs import last_event
from dsl_dist.report.served import metrics_at, split_items
from dsl_dist.config.compose import load_config
from test_launchers import free_port

pytestmark = pytest.mark.multiprocess
MAX_USERS = 300


@pytest.fixture(scope="module")
def service(lastfm_artifacts: dict[str, Path], monkeypatch_module: pytest.MonkeyPatch
            ) -> Iterator[str]:
    """The base URL of a Serve instance with the application of every artifact under
    /NAME."""
    import ray
    from ray import serve

    from dsl_dist.serving.serve import build_app

    for key in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch_module.delenv(key)  # never join a cluster of another test
    monkeypatch_module.setenv("RAY_USAGE_STATS_ENABLED", "0")
    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, path in lastfm_artifacts.items():
            serve.run(build_app(path, max_users=MAX_USERS, max_batch_size=8), name=name,
                      route_prefix=f"/{name}")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def call(url: str, body: Optional[Any] = None, raw: Optional[bytes] = None,
         method: Optional[str] = None) -> tuple[int, dict]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("name", list(EXPORT_RUNS))
def test_served_top20_reproduces_the_runs_evaluation(name: str, service: str,
                                                     lastfm_runs: dict[str, Path],
                                                     lastfm_artifacts: dict[str, Path]) -> None:
    ids = json.loads((lastfm_artifacts[name] / "ids.json").read_text())
    item_index = {raw: i for i, raw in enumerate(ids["items"])}
    test = split_items(Path(load_config(lastfm_runs[name] / "config.yaml").data.path))
    users = [ids["users"][u] for u in test.users]
    batches = [users[i:i + MAX_USERS] for i in range(0, len(users), MAX_USERS)]
    with ThreadPoolExecutor(4) as pool:  # concurrent requests, batched by the replica
        answers = list(pool.map(lambda b: call(f"{service}/{name}/recommend",
                                               {"users": b, "k": 20}), batches))
    tops = []
    for (status, answer), batch in zip(answers, batches):
        assert status == 200, answer
        assert [r["user"] for r in answer["recommendations"]] == batch
        tops += [[item_index[i] for i in r["items"]] for r in answer["recommendations"]]
    served = metrics_at(tops, test, 20)
    run = last_event(lastfm_runs[name], "eval")
    for metric, value in served.items():
        assert abs(value - run[metric]) <= 1e-6, (metric, value, run[metric])


def test_bad_requests_get_a_4xx_naming_the_problem(service: str,
                                                   lastfm_artifacts: dict[str, Path]) -> None:
    url = f"{service}/mf-dsl/recommend"
    ids = json.loads((lastfm_artifacts["mf-dsl"] / "ids.json").read_text())
    user, items = ids["users"][0], len(ids["items"])
    cases = [
        (dict(raw=b"{not json"), 400, "malformed JSON"),
        (dict(body=[user]), 400, 'list "users"'),
        (dict(body={"users": []}), 400, "empty"),
        (dict(body={"users": [user], "k": 0}), 400, "k=0"),
        (dict(body={"users": [user], "k": items + 1}), 400, f"k={items + 1}"),
        (dict(body={"users": [user], "k": "20"}), 400, "k='20'"),
        (dict(body={"users": [user, "nobody"]}), 404, "unknown user id(s) ['nobody']"),
        (dict(body={"users": [user] * (MAX_USERS + 1)}), 413, f"at most {MAX_USERS}"),
        (dict(body={"users": [user], "count": 3}), 400, "unknown field(s) ['count']"),
        (dict(method="GET"), 405, "use POST"),
    ]
    for kwargs, status, message in cases:
        got, answer = call(url, **kwargs)
        assert (got, message in answer.get("error", "")) == (status, True), (kwargs, answer)
    assert call(f"{service}/mf-dsl/nowhere")[0] == 404
    status, health = call(f"{service}/mf-dsl/healthz")
    assert status == 200 and health["status"] == "ok" and health["items"] == items
    status, answer = call(url, {"users": [user], "k": 5})
    assert status == 200 and len(answer["recommendations"][0]["items"]) == 5
