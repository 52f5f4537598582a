"""Export and serving figures on gowalla at density 0.2 (issue 18).

    python benchmarks/export_serve.py [--epochs 2] [--mf RUN_DIR] [--lightgcn RUN_DIR]
                                      [--models mf lightgcn] [--duration 20] [--skip-serve]

1. Trains MF (`+experiment=mf_gowalla_dsl`) and LightGCN (`+experiment=lightgcn_gowalla
   sparsity=dsl`) at d=0.2 for `--epochs` epochs on 2 ranks, unless run directories are given.
2. Exports both and writes `benchmarks/results/export_gowalla.json`: active weights, index
   bytes, the 1.2× bound, the bytes of every artifact file, export and load seconds, and the
   agreement of the Python API's top-20 with the run's own evaluation.
3. Serves the MF artifact on Ray Serve (127.0.0.1, one replica) and drives it with an asyncio
   client (aiohttp) holding `--concurrency` requests in flight for `--duration` seconds per
   setting, k=20, batch sizes (users per request) 1 and 64; writes requests/s, users/s and
   p50/p99 latency to `benchmarks/results/serve_gowalla.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NOTE = ("Measured on a shared 2-core machine while other jobs ran: timings (export, load, "
        "latency, throughput) are distorted by their load and are upper bounds; byte counts "
        "and metric agreement are exact.")
MODELS = {"mf": ["+experiment=mf_gowalla_dsl", "sparsity.density=0.2"],
          "lightgcn": ["+experiment=lightgcn_gowalla", "sparsity=dsl", "sparsity.density=0.2"]}


def train(name: str, epochs: int, data: Path) -> tuple[Path, list[str]]:
    overrides = [*MODELS[name], f"train.epochs={epochs}", "eval.every_epochs=0",
                 f"data.path={data}"]
    run_dir = REPO / "runs" / f"export-{name}-gowalla-dsl-d0.2-{time.strftime('%Y%m%d-%H%M%S')}"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "dsl_dist.train", *overrides,
                    f"run_dir={run_dir}"], cwd=REPO, check=True)
    return run_dir, overrides


def agreement(model: Any, run_dir: Path) -> dict[str, float]:
    """The Python API's Recall@20 / NDCG@20 over every test user against the run's own."""
    from dsl_dist.config.compose import load_config
    from dsl_dist.report.runs import last_event
    from dsl_dist.report.served import metrics_at, split_items

    test = split_items(Path(load_config(run_dir / "config.yaml").data.path))
    item_index = {raw: i for i, raw in enumerate(model.item_ids)}
    tops = []
    for start in range(0, len(test.users), 1024):
        recs = model.recommend([model.user_ids[u] for u in test.users[start:start + 1024]], 20)
        tops += [[item_index[i] for i in items] for items in recs.items]
    served, run = metrics_at(tops, test, 20), last_event(run_dir, "eval")
    return {**{f"served_{k}": v for k, v in served.items()},
            **{f"run_{k}": run[k] for k in served},
            "max_abs_difference": max(abs(served[k] - run[k]) for k in served)}


def export_figures(name: str, run_dir: Path, out: Path,
                   overrides: Optional[list[str]]) -> dict[str, Any]:
    from dsl_dist.serving.export import export, summary
    from dsl_dist.serving.inference import load

    started = time.perf_counter()
    meta = export(run_dir, out, overwrite=True)
    export_s = time.perf_counter() - started
    print(summary(meta))
    started = time.perf_counter()
    model = load(out)
    load_s = time.perf_counter() - started
    approximate = faiss_recall(model, out)
    b = meta["bytes"]
    weights = meta["files"]["weights.safetensors"]["bytes"]
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = sum(e["event"] == "epoch" for e in events)
    return {"model": name, "run_dir": str(run_dir), "overrides": overrides, "epochs": epochs,
            "training_note": f"a short run ({epochs} epochs, not the 30 of the training "
                             "benchmarks): the artifact's sizes depend on the density, not on "
                             "the epochs; its metrics are not the benchmark's",
            "tables": meta["tables"], **b, "weights_file_bytes": weights,
            "weights_file_vs_needed": weights / b["needed_bytes"],
            "within_bound": weights <= b["bound_bytes"],
            "files": {k: f["bytes"] for k, f in meta["files"].items()},
            "artifact_bytes": sum(f["bytes"] for f in meta["files"].values()),
            "export_seconds": export_s, "load_seconds": load_s,
            "top20_agreement": agreement(model, run_dir), "faiss": approximate}


def faiss_recall(model: Any, out: Path, users: int = 2000) -> dict[str, Any]:
    """Recall of the FAISS index's top 20 against the exact top 20, for a sample of users."""
    from dsl_dist.serving.inference import load

    started = time.perf_counter()
    approximate = load(out, approximate=True)
    build_s = time.perf_counter() - started
    sample = np.random.default_rng(0).choice(model.num_users, users, replace=False)
    started = time.perf_counter()
    _, truth = model.top_items(sample, 20)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    _, found = approximate.top_items(sample, 20)
    approximate_s = time.perf_counter() - started
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 20
                      for a, b in zip(truth, found)])
    return {"index": "HNSW, 32 neighbours, efSearch 256, inner product", "users": users,
            "recall_at_20_vs_exact": float(recall), "build_seconds": build_s,
            "exact_seconds": exact_s, "approximate_seconds": approximate_s}


async def drive(url: str, bodies: list[bytes], duration: float, concurrency: int
                ) -> dict[str, Any]:
    """Keeps `concurrency` requests in flight for `duration` seconds (bodies in turn)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def worker(session: aiohttp.ClientSession, offset: int) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < stop:
            started = time.perf_counter()
            async with session.post(url, data=bodies[i % len(bodies)],
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                errors += response.status != 200
            latencies.append(time.perf_counter() - started)
            i += concurrency

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session, c) for c in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def serve_figures(artifact: Path, duration: float, concurrency: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from dsl_dist.serving.serve import build_app

    with open(artifact / "ids.json") as f:
        users = json.load(f)["users"]
    rng = np.random.default_rng(0)
    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(artifact, max_batch_size=32), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/recommend"
        settings = {}
        for batch in (1, 64):
            bodies = [json.dumps({"users": [users[u] for u in rng.choice(len(users), batch)],
                                  "k": 20}).encode() for _ in range(256)]
            asyncio.run(drive(url, bodies, 2.0, concurrency))  # warm up
            result = asyncio.run(drive(url, bodies, duration, concurrency))
            result["users_per_s"] = result["requests_per_s"] * batch
            settings[f"batch_{batch}"] = result
            print(f"batch {batch}: {result}")
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"artifact": str(artifact), "k": 20, "concurrency": concurrency,
            "duration_s": duration, "replicas": 1, "max_batch_size": 32, "client":
            "asyncio + aiohttp on the same machine, closed loop", "settings": settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "gowalla")
    parser.add_argument("--mf", type=Path, help="an MF d=0.2 run to export (else trained)")
    parser.add_argument("--lightgcn", type=Path, help="a LightGCN d=0.2 run (else trained)")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    exports, runs = {}, {"mf": args.mf, "lightgcn": args.lightgcn}
    for name in args.models:
        run_dir = runs[name]
        overrides = None
        if run_dir is None:
            run_dir, overrides = train(name, args.epochs, args.data)
        exports[name] = export_figures(name, run_dir, REPO / "runs" / f"artifact-{name}-gowalla",
                                       overrides)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "export_gowalla.json"
    kept = json.loads(path.read_text())["models"] if path.exists() else {}  # other models'
    path.write_text(json.dumps({"machine": machine, "note": NOTE,
                                "models": {**kept, **exports}}, indent=2) + "\n")
    if not args.skip_serve:
        figures = serve_figures(REPO / "runs" / "artifact-mf-gowalla", args.duration,
                                args.concurrency)
        (RESULTS / "serve_gowalla.json").write_text(json.dumps(
            {"machine": machine, "note": NOTE, **figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
