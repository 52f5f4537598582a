"""What one drop-and-grow update's selection costs as the world grows, through each controller.

    python benchmarks/controller_scale.py [--ranks 2 4 8 16 32 64] [--weights-per-rank N]
                                          [--updates 3] [--transports collective ray]
                                          [--out PATH] [--quick]

N simulated ranks are N processes (forked from a server that imported the libraries once) in
a gloo group on 127.0.0.1, each holding one row-wise shard of a single (N·rows × 64) table of
random weights and random growth statistics: no model, no training step. Each rank builds the
real `DynamicSparseTraining` over its shard (a `TableShard` whose kernel is a stand-in holding
row-wise Adagrad's per-row state) with the real controller of each transport
(`connect_controller`): `collective`, a replica on every rank, and `ray`, the named actor on
a local Ray instance the benchmark starts in its own temporary directory and shuts down after.
It then times `update(step)`, drop-and-grow's selection and move, between two barriers.

Per (transport, N) it reports rank 0's median seconds per update, wall clock and CPU time of
its main thread (the local work, to which waiting for oversubscribed peers adds little); the
bytes each rank hands to the count all-reduces of an update (counted from the tensors given
to `DistContext`) and their number; and the bytes to and from the controller: 0 for the
replica, for the actor the pickled arguments and results of every call of an update, summed
over the ranks. A round is one of the selection's count all-reduces (a histogram of 65,536
counts); per-round figures divide an update's bytes by its rounds. A world whose projected
memory (the last world's PSS per rank) exceeds MEMORY_SHARE of the available memory is not
started, and the notes say so. Writes benchmarks/results/controller_scale.json (or --out) and
prints the figures as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.multiprocessing as mp
from torch import nn

from dsl_dist.distributed import DistContext

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
COLS = 64
"""Columns of the table (the issue's synthetic catalogue has dimension 64)."""
DENSITY = 0.2
TRANSPORTS = ("collective", "ray")
MEMORY_SHARE = 0.5
"""The most of the machine's available memory a world may take (other jobs share it)."""


@dataclass(frozen=True)
class MeteredContext(DistContext):
    """This rank's `DistContext`, recording the bytes of every tensor it hands to a count
    reduction (an int for the max/min ones)."""

    reductions: list[int] = field(default_factory=list)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.reductions.append(tensor.numel() * tensor.element_size())
        return super().all_reduce_sum(tensor)

    def all_reduce_max(self, value: int) -> int:
        self.reductions.append(torch.tensor(value, dtype=torch.int64).element_size())
        return super().all_reduce_max(value)


class MeteredActor:
    """The controller actor's handle, adding up the pickled size of every call's arguments
    (`sent`) and, once `settle` resolves them, of its results (`received`)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.sent = self.received = 0
        self.pending: list[Any] = []

    def __getattr__(self, name: str) -> SimpleNamespace:
        method = getattr(self.actor, name)

        def remote(*args: Any) -> Any:
            self.sent += len(pickle.dumps(args, protocol=5))
            ref = method.remote(*args)
            self.pending.append(ref)
            return ref

        return SimpleNamespace(remote=remote)

    def settle(self) -> tuple[int, int]:
        """(sent, received) since the last call, and starts counting afresh."""
        import ray

        received = sum(len(pickle.dumps(ray.get(ref), protocol=5)) for ref in self.pending)
        sent, self.sent, self.pending = self.sent, 0, []
        return sent, received


class RowwiseAdagradState:
    """The fused optimizer state DSL resets: row-wise Adagrad's one accumulator per row."""

    def __init__(self, rows: int) -> None:
        self.accumulator = torch.rand(rows)

    def split_optimizer_states(self) -> list[list[torch.Tensor]]:
        return [[self.accumulator]]


class ShardKernel(nn.Module):
    """What DSL reads of the embedding kernel behind a shard (see torchrec_internals.py): a
    fused (not data-parallel) kernel of one table shard, its optimizer state, and a module to
    hang the growth hooks on (never called: there is no forward pass here)."""

    def __init__(self, table: str, rows: int, table_rows: int) -> None:
        from torchrec.distributed.embedding_types import EmbeddingComputeKernel

        super().__init__()
        shard = SimpleNamespace(name=table, local_metadata=None, local_rows=rows,
                                local_cols=COLS, num_embeddings=table_rows, embedding_dim=COLS,
                                feature_names=[table])
        self.config = SimpleNamespace(compute_kernel=EmbeddingComputeKernel.FUSED,
                                      embedding_tables=[shard])
        self.emb_module = RowwiseAdagradState(rows)


def _refill(weight: torch.Tensor, growth: torch.Tensor, generator: torch.Generator) -> None:
    """Fresh random magnitudes and growth statistics, as training would leave them."""
    weight.normal_(generator=generator)
    growth.copy_(torch.rand(growth.shape, generator=generator))


def _run_transport(transport: str, ctx: MeteredContext, shard: Any, ray_address: Optional[str],
                   updates: int, generator: torch.Generator) -> list[dict[str, Any]]:
    """Builds DSL over `shard` with `transport`'s controller and times `updates` updates."""
    from dsl_dist.config import ControlConfig, DSLConfig
    from dsl_dist.control import connect_controller
    from dsl_dist.sparsity.budget import budget_groups
    from dsl_dist.sparsity.unstructured.dsl import DynamicSparseTraining
    from dsl_dist.sparsity.schedule import UpdateSchedule

    cfg = DSLConfig(density=DENSITY, delta_t=1)
    shape = (shard.table_rows, COLS)
    groups = budget_groups(cfg, {shard.table: shape[0] * shape[1]})
    schedule = UpdateSchedule.of(cfg, total_steps=100 * updates)
    controller = connect_controller(ControlConfig(controller=transport, ray_address=ray_address),
                                    ctx, schedule, [g.budget for g in groups])
    meter = None
    if transport == "ray":
        meter = controller.actor = MeteredActor(controller.actor)
    dsl = DynamicSparseTraining(cfg, [shard], {shard.table: shape}, groups, ctx, 0, controller)
    rows = []
    for step in range(1, updates + 1):
        _refill(shard.weight, dsl.shards[0].growth, generator)
        if meter:
            meter.settle()
        ctx.reductions.clear()
        ctx.barrier()
        started, cpu_started = time.perf_counter(), time.thread_time()
        record = dsl.update(step)
        cpu_seconds = time.thread_time() - cpu_started
        ctx.barrier()
        seconds = time.perf_counter() - started
        sent, received = meter.settle() if meter else (0, 0)
        rows.append({"seconds": seconds, "cpu_seconds": cpu_seconds,
                     "reductions": list(ctx.reductions),
                     "controller_sent": sent, "controller_received": received,
                     "moved": record.dropped})
    return rows


def _rank(rank: int, world_size: int, port: int, weights_per_rank: int, updates: int,
          transports: list[str], ray_address: Optional[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # as training processes run
    from dsl_dist.distributed import init_distributed, shutdown_distributed
    from dsl_dist.model.shards import TableShard

    base = init_distributed("gloo")
    ctx = MeteredContext(base.rank, base.world_size, base.device, base.backend, base.group)
    rows = weights_per_rank // COLS
    generator = torch.Generator().manual_seed(rank)
    weight = torch.empty(rows, COLS)
    shard = TableShard("items", rank * rows, 0, rows, COLS, world_size * rows, COLS, weight,
                       ShardKernel("items", rows, world_size * rows), 0)
    result = {t: _run_transport(t, ctx, shard, ray_address, updates, generator)
              for t in transports}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["pss_mb"] = _meminfo_mb("/proc/self/smaps_rollup", "Pss")
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    ctx.barrier()
    shutdown_distributed()
    os._exit(0)  # the result is on disk: skip the libraries' teardown


def _meminfo_mb(path: str, key: str) -> float:
    """A `key: N kB` line of a /proc memory summary, in MiB."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(f"{key} not in {path}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarise(transport: str, world_size: int, weights_per_rank: int,
              ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the results from every rank's per-update figures for `transport`."""
    from dsl_dist.sparsity.selection.exact import BINS

    updates = ranks[0][transport]
    per_update = [u["reductions"] for u in updates]
    rounds = [[b for b in r if b >= BINS * 8] for r in per_update]
    rank_bytes = [max(sum(r[transport][i]["reductions"]) for r in ranks)
                  for i in range(len(updates))]
    controller_bytes = [sum(r[transport][i]["controller_sent"] +
                            r[transport][i]["controller_received"] for r in ranks)
                        for i in range(len(updates))]
    return {"transport": transport, "ranks": world_size, "weights_per_rank": weights_per_rank,
            "update_seconds": statistics.median(u["seconds"] for u in updates),
            "update_cpu_seconds": statistics.median(u["cpu_seconds"] for u in updates),
            "controller_bytes_per_round": statistics.median(
                b / len(r) for b, r in zip(controller_bytes, rounds)),
            "rank_bytes_per_round": statistics.median(sum(r) / len(r) for r in rounds),
            "rounds_per_update": statistics.median(len(r) for r in rounds),
            "reductions_per_update": statistics.median(len(r) for r in per_update),
            "controller_bytes_per_update": statistics.median(controller_bytes),
            "rank_bytes_per_update": statistics.median(rank_bytes),
            "moved_per_update": statistics.median(u["moved"] for u in updates),
            "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in ranks),
            "pss_mb_per_rank": max(r["pss_mb"] for r in ranks)}


def run_world(world_size: int, weights_per_rank: int, updates: int, transports: list[str],
              ray_address: Optional[str], work: Path) -> list[dict[str, Any]]:
    out = work / f"world{world_size}"
    out.mkdir()
    mp.start_processes(_rank, args=(world_size, _free_port(), weights_per_rank, updates,
                                    transports, ray_address, str(out)),
                       nprocs=world_size, start_method="forkserver")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    return [summarise(t, world_size, weights_per_rank, ranks) for t in transports]


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = [("transport", "{:<10}"), ("ranks", "{:>5}"), ("weights_per_rank", "{:>10}"),
               ("update_seconds", "{:>8.3f}"), ("update_cpu_seconds", "{:>8.3f}"),
               ("rounds_per_update", "{:>6}"),
               ("rank_bytes_per_round", "{:>10.0f}"), ("controller_bytes_per_round", "{:>9.0f}"),
               ("controller_bytes_per_update", "{:>9.0f}"), ("pss_mb_per_rank", "{:>6.0f}")]
    heads = ["transport", "ranks", "w/rank", "s/update", "cpu s", "rounds", "B/rank/rnd",
             "ctl B/rnd", "ctl B/upd", "PSS MB"]
    print("  ".join(f"{h:>{len(f.format(rows[0][c]))}}" for h, (c, f) in zip(heads, columns)))
    for row in rows:
        print("  ".join(f.format(row[c]) for c, f in columns))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--weights-per-rank", type=int, default=1 << 20)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "controller_scale.json")
    parser.add_argument("--quick", action="store_true",
                        help="2 ranks, 64K weights each, 2 updates, collective only (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.ranks, args.weights_per_rank, args.updates = [2], 1 << 16, 2
        args.transports = ["collective"]
    # Ranks fork from a server that imported these once: their pages are shared, not copied
    # (not Ray: drivers forked with it imported crash connecting, "Seal() called on an object
    # without a reference to it").
    mp.set_forkserver_preload(["torch", "dsl_dist.sparsity.unstructured.dsl"])
    work = Path(tempfile.mkdtemp(prefix="ctlscale", dir="/tmp"))  # short: Ray's socket paths
    ray_address = None
    rows: list[dict[str, Any]] = []
    stopped = f"ran every N asked for ({args.ranks})"
    try:
        if "ray" in args.transports:
            import ray

            os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")  # shared, busy cores
            ray.init(num_cpus=1, include_dashboard=False, _temp_dir=str(work / "ray"),
                     _node_ip_address="127.0.0.1", log_to_driver=False)
            ray_address = ray.get_runtime_context().gcs_address
        for n in args.ranks:
            available = _meminfo_mb("/proc/meminfo", "MemAvailable")
            needed = n * max((r["pss_mb_per_rank"] for r in rows), default=0.0)
            if needed > MEMORY_SHARE * available:
                stopped = (f"stopped before N={n}: {n} ranks at the last world's "
                           f"{needed / n:.0f} MiB (PSS) each need {needed / 1024:.1f} GiB, "
                           f"over {MEMORY_SHARE:.0%} of the {available / 1024:.1f} GiB available")
                break
            rows += run_world(n, args.weights_per_rank, args.updates, args.transports,
                              ray_address, work)
    finally:
        if ray_address:
            import ray

            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    print(stopped)
    notes = {"round": "one count all-reduce of the selection: an int64 histogram of 65,536 "
                      "counts (+2 header counts in each selection's first round); an update "
                      "runs two selections (drop, grow), two rounds each for the 32-bit score "
                      "keys plus up to ceil(position bits / 16) for ties at the threshold "
                      "(always for the bfloat16 growth statistic), and two small reductions "
                      "(moved and active counts, mask digest): reductions_per_update",
             "rank_bytes": "what one rank hands to the all-reduces (the tensors' bytes); a ring "
                           "all-reduce sends about twice that on each rank's link",
             "controller_bytes": "collective: no controller to talk to (a replica on every "
                                 "rank); ray: pickled arguments and results of every actor "
                                 "call of an update (plan by every rank, record by rank 0), "
                                 "summed over the ranks, without Ray's per-call overhead",
             "machine": f"{os.cpu_count()} CPU cores shared with other jobs: every rank is a "
                        "process, so timings beyond 2 ranks are oversubscribed",
             "ranks": stopped, "argv": argv}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "notes": notes}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
