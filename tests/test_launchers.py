"""The same small DSL run on lastfm through every launch path gives the same masks and metrics.

Paths: torchrun with the collective controller (the reference), torchrun with the controller as
a Ray actor, `ray job submit` of the Ray Train launcher on a simulated 2-node Ray cluster (two
raylets on this machine with one CPU each, so the two workers land on different nodes), and
`torchrun --nnodes 2` with two launchers rendezvousing over 127.0.0.1. "Same masks" is checked
through the mask digest every update line carries (a hash sum of the active positions).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, SHARED_DATA

BIN = Path(sys.executable).parent
RUN_OVERRIDES = ["sparsity=dsl", "sparsity.density=0.2", "sparsity.delta_t=20",
                 "data.batch_size=256", "train.epochs=4", "checkpoint.every=40",
                 "model.sharding_type=row_wise"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # RAY_AUTH_MODE: a local ray.init() (test_controller's, test_serve's) leaves a token in
    # ~/.ray/auth_token (the suite's temporary HOME), and `ray start` then turns token auth
    # on, which these loopback clusters' clients would need; the tests opt out unless `extra`
    # says otherwise (as the README's commands do).
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled")
    env.update(extra)
    return env


def record(run_dir: Path) -> dict[str, list[dict]]:
    """What must not depend on the launch path: every update (mask digest included) and
    evaluation, and the epochs' losses, without what the run measured of its machine (times,
    memory)."""
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = {"seconds", "samples_per_s", "peak_rss_mb", "rss_mb_before"}
    kept = [{k: v for k, v in e.items() if k not in timing} for e in events]
    return {kind: [e for e in kept if e["event"] == kind] for kind in ("update", "eval", "epoch")}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("launch") / "lastfm"


def job_overrides(prepared: Path, run_dir: Path) -> list[str]:
    return [f"data.source={SHARED_DATA / 'lastfm'}", f"data.path={prepared}", *RUN_OVERRIDES,
            f"run_dir={run_dir}"]


def torchrun(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train",
             *job_overrides(prepared, run_dir), "control.controller=collective",
             env=environment())
    result = record(run_dir)
    assert len(result["update"]) >= 2 and result["eval"]
    assert all(u["active"] == u["budget"] for u in result["update"])
    assert len({u["mask_digest"] for u in result["update"]}) == len(result["update"])
    return result


def answers(url: str) -> bool:
    """Whether an HTTP server answers at `url` (401 included: token auth without a token)."""
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        pass
    return True


class RayCluster:
    """A head and `nodes` - 1 more nodes, each a raylet with `cpus` CPUs, on loopback: the
    dashboard and job API on 127.0.0.1, token authentication per `auth` (RAY_AUTH_MODE). Each
    `ray start --block` leads its own process group, which teardown kills whole (so no other
    Ray instance on the machine is touched)."""

    def __init__(self, nodes: int = 2, cpus: int = 1, auth: str = "disabled") -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="dslray", dir="/tmp")  # short: socket paths
        self.port, self.dashboard_port, agent_port = free_port(), free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = environment(RAY_AUTH_MODE=auth)
        self.processes: list[subprocess.Popen] = []
        common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                  "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        try:
            self._start("head", "--head", "--port", str(self.port),
                        "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(self.dashboard_port),
                        "--dashboard-agent-listen-port", str(agent_port), *common)
            self._wait_for(lambda: answers(f"{self.dashboard}/api/version"),
                           "the head's dashboard")
            # the head gives a submitted job 10 s to find its agent: a slow start misses that
            self._wait_for(lambda: answers(f"http://127.0.0.1:{agent_port}/api/healthz"),
                           "the head's job agent")
            for node in range(1, nodes):
                self._start(f"node{node}", "--address", self.address, *common)
            self._wait_for(lambda: self.nodes() == nodes or None, "every node")
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, *args: str) -> None:
        with open(Path(self.temp_dir) / f"{name}.out", "w") as out:
            self.processes.append(subprocess.Popen(
                [str(BIN / "ray"), "start", *args], env=self.env, start_new_session=True,
                stdout=out, stderr=subprocess.STDOUT))

    def _wait_for(self, ready, what: str, seconds: float = 240) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                if ready():
                    return
            except OSError:
                pass
            exited = [p.args[2:4] for p in self.processes if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                raise TimeoutError(f"Ray cluster did not come up: waited for {what}; "
                                   f"exited: {exited}\n{self.logs()}")
            time.sleep(1)

    def logs(self, tail: int = 1500) -> str:
        """The ends of `ray start`'s output and of the session's error logs, for a failure."""
        root = Path(self.temp_dir)
        files = [*root.glob("*.out"), *root.glob("session_latest/logs/*.err"),
                 *root.glob("session_latest/logs/dashboard.log")]
        return "\n".join(f"--- {f.name}:\n{f.read_text(errors='replace')[-tail:]}"
                         for f in files if f.stat().st_size)

    def nodes(self) -> int:
        status = subprocess.run([str(BIN / "ray"), "status", "--address", self.address],
                                env=self.env, capture_output=True, text=True, timeout=60)
        return status.stdout.split("Pending:")[0].count(" node_")

    def stop(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.multiprocess
def test_ray_job_submit_on_two_nodes_matches_torchrun(ray_cluster: RayCluster, prepared: Path,
                                                      reference: dict, tmp_path: Path) -> None:
    assert ray_cluster.nodes() == 2
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--",
         "python", "-m", "dsl_dist.ray_train", *job_overrides(prepared, run_dir),
         "ray.num_workers=2", "ray.cpus_per_worker=1", f"ray.storage_path={tmp_path / 'ray'}"],
        cwd=REPO, env=environment(RAY_ADDRESS=ray_cluster.dashboard), capture_output=True,
        text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "succeeded" in done.stdout + done.stderr
    assert "final metrics: {" in done.stdout, done.stdout[-2000:]
    assert record(run_dir) == reference
    reported = list((tmp_path / "ray").rglob("metrics.json"))
    assert reported and json.loads(reported[-1].read_text())["recall@20"] == \
        reference["eval"][-1]["recall@20"]


@pytest.mark.multiprocess
def test_torchrun_with_the_ray_actor_controller_matches(ray_cluster: RayCluster,
                                                        prepared: Path, reference: dict,
                                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train",
             *job_overrides(prepared, run_dir), "control.controller=ray",
             f"control.ray_address={ray_cluster.address}", env=environment())
    assert record(run_dir) == reference


@pytest.mark.multiprocess
def test_structured_dsl_with_the_ray_actor_controller_matches(ray_cluster: RayCluster,
                                                              prepared: Path,
                                                              tmp_path: Path) -> None:
    """block_dsl plans through the actor as dsl does: the same blocks as the collective
    controller, update by update."""
    runs = {}
    for controller in ("collective", "ray"):
        run_dir = tmp_path / controller
        torchrun("--standalone", "--nproc_per_node", "2", "-m", "dsl_dist.train",
                 *job_overrides(prepared, run_dir), "sparsity=block_dsl",
                 f"control.controller={controller}", f"control.ray_address={ray_cluster.address}",
                 env=environment())
        runs[controller] = record(run_dir)
    assert len(runs["ray"]["update"]) >= 2
    assert all(u["active"] == u["budget"] for u in runs["ray"]["update"])
    assert runs["ray"] == runs["collective"]


@pytest.mark.multiprocess
def test_torchrun_across_two_nodes_matches(prepared: Path, reference: dict,
                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "dsl-launch-test",
               "--local-addr", "127.0.0.1", "-m", "dsl_dist.train",
               *job_overrides(prepared, run_dir)]
    nodes = [subprocess.Popen(command, cwd=REPO, env=environment(OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert record(run_dir) == reference


def processes_titled(title: bytes) -> list[int]:
    """PIDs of the processes whose command line (Ray's process title) contains `title`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if title in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def newest_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    return max(steps, default=0)


@pytest.mark.multiprocess
def test_ray_job_survives_a_killed_worker_and_a_killed_controller(
        ray_cluster: RayCluster, prepared: Path, reference: dict, tmp_path: Path) -> None:
    """Ray Train restarts the worker group from the last checkpoint each time: first after a
    worker is SIGKILLed (the controller actor lives on and starts a new session), then after
    the controller actor itself is (rank 0 creates a new one and restores its history)."""
    run_dir = tmp_path / "run"
    job = subprocess.Popen(
        [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--",
         "python", "-m", "dsl_dist.ray_train", *job_overrides(prepared, run_dir),
         "ray.num_workers=2", "ray.max_failures=2", f"ray.storage_path={tmp_path / 'ray'}"],
        cwd=REPO, env=environment(RAY_ADDRESS=ray_cluster.dashboard), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    for title in (b"ray::RayTrainWorker", b"ray::ControllerActor"):
        reached = newest_step(run_dir)
        deadline = time.monotonic() + 240
        while newest_step(run_dir) <= reached:
            assert job.poll() is None and time.monotonic() < deadline, f"no checkpoint ({title})"
            time.sleep(0.05)
        victims = processes_titled(title)
        assert victims, title
        os.kill(victims[-1], signal.SIGKILL)
    out, _ = job.communicate(timeout=400)
    assert job.returncode == 0, out[-4000:]
    resumes = set(re.findall(r"resumed from \S+ at step \d+", out))
    assert len(resumes) == 2, f"expected two restarts, saw {resumes}"
    assert record(run_dir) == reference


@pytest.mark.multiprocess
def test_the_readmes_ray_job_with_token_auth_keeps_its_run_and_resumes(
        private_home: Path, tmp_path: Path) -> None:
    """As the README says: a token (`ray get-auth-token --generate`, in the suite's HOME),
    RAY_AUTH_MODE=token for `ray start` and `ray job submit`, a relative run_dir. The run is
    kept under ray.storage_path (default ~/dsl-dist, printed), each line of rank 0 printed
    once; the same command submitted again after the job stopped at a checkpoint resumes
    from it, to the same events."""
    from conftest import write_clustered_dataset

    generated = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"],
                               env=environment(), capture_output=True, text=True, timeout=60)
    assert generated.returncode == 0, generated.stderr
    assert (private_home / ".ray" / "auth_token").is_file()
    source = write_clustered_dataset(tmp_path / "source")
    submit = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--",
              "python", "-m", "dsl_dist.ray_train", "ray.num_workers=2",
              f"data.source={source}", f"data.path={tmp_path / 'prepared'}",
              "data.batch_size=32", "train.epochs=3", "model.embedding_dim=16",
              "checkpoint.every=20", "run_dir=runs/readme"]
    cluster = RayCluster(nodes=1, cpus=2, auth="token")
    try:
        env = environment(RAY_AUTH_MODE="token", RAY_ADDRESS=cluster.dashboard)
        first = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=400)
        assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
        run_dir = private_home / "dsl-dist" / "runs" / "readme"
        assert f"storage_path {private_home / 'dsl-dist'}: run_dir {run_dir}" in first.stdout
        epochs = re.findall(r"epoch \d+ step \d+ loss .*", first.stdout)
        assert len(epochs) == 3, first.stdout[-4000:]  # once each: rank 0 only, no echo
        finished = record(run_dir)

        final, *_ = sorted((run_dir / "checkpoints").glob("step-*"), reverse=True)
        shutil.rmtree(final)  # as if the job had stopped after its last periodic checkpoint
        again = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=400)
    finally:
        cluster.stop()
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert len(re.findall(rf"resumed from {run_dir}/checkpoints/step-0+40 at step 40",
                          again.stdout)) == 1, again.stdout[-4000:]
    assert record(run_dir) == finished
