"""benchmarks/gpu_check.py's CPU rehearsal runs every step of the GPU check, where a bare GPU
image's missing packages are missing too (tests/image), and writes figures each target can be
read from; its parts (the version table, the profile's arithmetic, the windows, the time limits)
are checked on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import REPO

from gpu_env import FBGEMM_OF_TORCH, SMALL_WHEELS, mismatch
from gpu_profile import Activity, Plan, busy_ns, kind, summarise
from test_packaging import CPU, CUDA, pinned

IMAGE_LACKS = ("ray,jsonschema,kubernetes_validate,tensorboard,tensorboardX,matplotlib,PIL,"
               "safetensors,faiss,tqdm,torchmetrics")
"""What the GPU image had none of (and the wheelhouse does not bring)."""
TINY_TABLE_WEIGHTS = (200 + 100) * 16
"""The users' and items' tables of the rehearsal's data set (write_tiny_dataset) at dim 16."""


def image_environment() -> dict[str, str]:
    return {**os.environ, "DSL_MISSING_MODULES": IMAGE_LACKS,
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "image"), str(REPO),
                                           os.environ.get("PYTHONPATH", "")])}


def gpu_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env=env or image_environment())


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    done = gpu_check("--cpu", "--out", str(out))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "PASS" in done.stdout and "step " in done.stdout  # the closing summary
    return out, json.loads(out.read_text())


def test_cpu_rehearsal_runs_every_step_without_the_optional_packages(
        rehearsal: tuple[Path, dict[str, Any]]) -> None:
    result = rehearsal[1]
    assert result["ok"] and result["mode"] == "cpu" and result["batches"] == [64, 256]
    assert all(result["machine"][k] for k in ("device", "torch", "fbgemm", "torchrec"))
    steps = result["steps"]
    assert list(steps) == ["plain_loop", "train_mf", "train_lightgcn", "updates", "unit_tests",
                           "pipeline", "memory"]
    assert all(steps[s]["status"] == "ok" for s in list(steps)[:5]), steps
    assert steps["memory"]["status"] == "skipped" and "CUDA only" in steps["memory"]["note"]
    assert steps["pipeline"]["status"] in ("ok", "skipped"), steps["pipeline"]
    assert [r["batch"] for r in result["plain_loop"]] == [64, 256]
    assert all(r["ok"] and r["samples_per_s"] > 0 for r in result["plain_loop"])
    tests = result["unit_tests"]
    assert tests["ok"] and tests["passed"] >= 3 and "failed" not in tests
    assert "DSL_TEST_DEVICE=cpu" in tests["command"] and "-m cuda" in tests["command"]


def test_every_run_has_its_throughput_ratios_profile_and_update(
        rehearsal: tuple[Path, dict[str, Any]]) -> None:
    result = rehearsal[1]
    runs = {(r["model"], r["method"], r["batch"]): r for r in result["runs"]}
    assert sorted(runs) == sorted((m, s, b) for m in ("mf", "lightgcn")
                                  for s in ("dense", "dsl", "block_dsl") for b in (64, 256))
    for (model, method, batch), run in runs.items():
        assert run["ok"] and run["samples_per_s"] > 0 and run["timed_steps"] >= 2, run
        plain = next(r for r in result["plain_loop"] if r["batch"] == batch)
        assert run["vs_plain"] == pytest.approx(run["samples_per_s"] / plain["samples_per_s"])
        dense = runs[(model, "dense", batch)]
        assert run["vs_dense"] == pytest.approx(run["samples_per_s"] / dense["samples_per_s"])
        profile = run["profile"]
        assert profile["cpu_ops_per_step"] > 0 and profile["busy_fraction"] is None  # no GPU
        assert profile["syncs_per_step"] == 0 and profile["kernels_per_step"] == 0
        assert run["phase_peaks_mb"]["peak_rss_mb"] > 0
        if method == "dense":
            assert run["updates"] == 0
        else:  # one update, in the warm-up, with the budget kept
            assert run["updates"] == 1 and run["update_seconds"][0] > 0
            assert run["active"] == run["budget"] == round(0.2 * TINY_TABLE_WEIGHTS), run


def test_updates_and_targets_are_recorded(rehearsal: tuple[Path, dict[str, Any]]) -> None:
    result = rehearsal[1]
    updates = {(u["method"], u["touched_rows"]): u for u in result["updates"]}
    assert sorted(updates) == sorted((m, t) for m in ("dsl", "block_dsl") for t in (0.03, 1.0))
    for update in updates.values():
        assert update["ok"] and update["weights"] >= 1 << 16 and update["device"] == "cpu"
        assert update["active"] == update["budget"] and update["moved"] > 0, update
        assert update["seconds"] > 0 and update["extra_mb"] is not None
    targets = {t["target"]: t for t in result["targets"]}
    assert len(targets) == 18
    assert all(t["pass"] in (True, False, None) for t in targets.values())
    ratio = targets["dense MF / plain TorchRec loop, batch 64"]
    assert ratio["pass"] == (ratio["value"] >= 0.9) and ratio["limit"] == 0.9
    assert targets["GPU busy, dense MF, batch 256"]["pass"] is None  # not measurable on CPU
    assert targets["dsl update of 7e+04 weights, 3% of rows touched, seconds"]["value"] > 0


def test_the_figures_print_as_markdown_tables(rehearsal: tuple[Path, dict[str, Any]]) -> None:
    done = gpu_check("--markdown", str(rehearsal[0]), env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    runs = len(rehearsal[1]["runs"]) + len(rehearsal[1]["pipeline"])
    assert len(rows) == 2 + runs + 18  # the two headers, the runs, the targets
    assert any(line.startswith("| mf | dsl | 256 | ") for line in rows)


def test_only_reruns_its_steps_into_the_json_and_a_spent_budget_skips_the_rest(
        rehearsal: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    earlier = json.loads(rehearsal[0].read_text())
    earlier["plain_loop"] = []
    out.write_text(json.dumps(earlier))
    done = gpu_check("--cpu", "--only", "plain_loop", "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:]
    result = json.loads(out.read_text())
    assert result["steps"]["plain_loop"]["status"] == "ok"
    assert [r["batch"] for r in result["plain_loop"]] == [64, 256]  # measured again
    assert result["steps"]["train_mf"]["status"] == "ok"  # kept from the full check
    assert len(result["runs"]) == 12
    gpu_check("--cpu", "--only", "unit_tests", "--budget", "0.5", "--out", str(out))
    assert json.loads(out.read_text())["steps"]["unit_tests"] == {
        "status": "skipped", "note": "out of the check's budget"}


def test_a_step_past_its_limit_is_cut_and_recorded_as_a_timeout() -> None:
    from gpu_steps import run_step

    check = SimpleNamespace(deadline=0.0, slow=lambda: time.sleep(30))
    started = time.time()
    outcome = run_step(check, "slow", limit=1.0)
    assert outcome["status"] == "timeout" and "over its 1 s limit" in outcome["note"]
    assert time.time() - started < 20  # cut, not waited out


def test_an_unknown_step_is_refused_in_one_line() -> None:
    done = gpu_check("--cpu", "--only", "train_mf,warp_drive", env=dict(os.environ))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "gpu_check: --only warp_drive: no such step (steps: plain_loop,train_mf,"
        "train_lightgcn,updates,unit_tests,pipeline,memory)")


def test_optional_test_dependencies_skip_instead_of_failing_collection() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "--collect-only",
                           "-p", "no:cacheprovider", "-rs", "tests"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=image_environment())
    assert done.returncode == 0, done.stdout[-3000:]
    assert "error" not in done.stdout.splitlines()[-1]
    assert done.stdout.count("SKIPPED") >= 4


def test_versions_follow_the_release_table() -> None:
    assert mismatch("2.13.0+cpu", "1.8.0", "1.8.0") is None
    assert mismatch("2.11.0+cu130", "1.6.0", "1.6.1") is None  # the H200 image's set
    assert mismatch("2.11.0+cu130", "1.8.0", "1.8.0") == (
        "torch 2.11.0+cu130, fbgemm-gpu 1.8.0, torchrec 1.8.0: torch 2.11 needs fbgemm-gpu "
        "1.6.x and torchrec 1.6.x")
    assert "torchrec 1.6.x" in mismatch("2.11.0", "1.6.0", "1.5.0")
    assert "not in the compatibility table" in mismatch("2.99.0", "1.6.0", "1.6.0")
    assert mismatch("2.11.0", None, "1.6.1").endswith("fbgemm-gpu not installed")
    torch_release = ".".join(pinned(CUDA["torch"]).split(".")[:2])
    assert pinned(CUDA["fbgemm-gpu"]).startswith(FBGEMM_OF_TORCH[torch_release] + ".")
    assert pinned(CUDA["torchrec"]).startswith(FBGEMM_OF_TORCH[torch_release] + ".")


def test_the_wheelhouse_pins_what_the_project_pins() -> None:
    for line in SMALL_WHEELS:
        name, version = line.lower().split("==")
        if name in CPU:
            assert pinned(CPU[name]) == version, line


def test_a_mismatched_set_is_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    import gpu_check

    monkeypatch.setattr(gpu_check, "installed", lambda: {
        "torch": "2.11.0+cu130", "fbgemm": "1.8.0", "torchrec": "1.8.0"})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu"])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    assert str(stop.value).startswith("gpu_check: refusing torch 2.11.0+cu130, fbgemm-gpu "
                                      "1.8.0, torchrec 1.8.0: torch 2.11 needs")


def test_the_profile_counts_kernels_syncs_and_busy_time() -> None:
    events = [Activity("cpu_op", "aten::mul", 0, 10),
              Activity("cuda_runtime", "cudaLaunchKernel", 1, 2),
              Activity("cuda_runtime", "cudaStreamSynchronize", 3, 9),
              Activity("cuda_runtime", "cudaMemcpyAsync", 3, 4),
              Activity("kernel", "k1", 100, 300), Activity("kernel", "k2", 200, 400),
              Activity("kernel", "k3", 1000, 1100), Activity("gpu_memcpy", "Memcpy HtoD", 0, 5),
              Activity("gpu_user_annotation", "## forward ##", 0, 5000)]
    figures = summarise(events, steps=2, step_seconds=1e-6)
    assert figures["kernels_per_step"] == 1.5 and figures["copies_per_step"] == 0.5
    assert figures["syncs_per_step"] == 0.5 and figures["cpu_ops_per_step"] == 0.5
    assert figures["syncs_per_step_by_call"]["cudaStreamSynchronize"] == 0.5
    assert figures["kernel_ms_per_step"] == pytest.approx(400 / 2 / 1e6)
    assert figures["busy_fraction"] == pytest.approx(0.2)  # 200 ns a step of 1000
    assert busy_ns([(0, 10), (5, 20), (30, 40), (32, 35)]) == 30


def test_activity_kinds_are_inferred_where_torch_does_not_say_them() -> None:
    def event(name: str, device: Any) -> SimpleNamespace:
        return SimpleNamespace(name=lambda: name, device_type=lambda: device)

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    annotations = {"## forward ##"}
    assert kind(event("void fbgemm_kernel<float>", cuda), annotations) == "kernel"
    assert kind(event("## forward ##", cuda), annotations) == "gpu_user_annotation"
    assert kind(event("Memcpy HtoD (Pageable -> Device)", cuda), annotations) == "gpu_memcpy"
    assert kind(event("cudaStreamSynchronize", cpu), annotations) == "cuda_runtime"
    assert kind(event("aten::mul", cpu), annotations) == "cpu_op"


def test_memory_runs_are_read_from_memory_py_and_give_the_memory_targets(tmp_path: Path) -> None:
    from gpu_steps import memory_runs
    from gpu_targets import targets

    written = tmp_path / "memory_cuda.json"
    written.write_text(json.dumps({"runs": [{"method": "structured", "density": 0.2,
                                             "peak_cuda_mb": [400.0, 380.0]}]}))
    output = "\n".join([json.dumps({"method": "dense", "density": 1.0, "peak_cuda_mb": 1000.0}),
                        json.dumps({"method": "unstructured", "density": 0.1, "peak_cuda_mb": 9}),
                        json.dumps({"method": "unstructured", "density": 0.2,
                                    "peak_cuda_mb": 1400.0}),
                        "some log line", f"wrote {written}"])
    runs = memory_runs(output)
    assert [(r["method"], r["density"]) for r in runs] == [("dense", 1.0), ("dsl", 0.2),
                                                           ("block_dsl", 0.2)]
    found = {t["target"]: t for t in targets({"batches": [2048, 32768], "update_weights": 10**9,
                                              "memory": {"runs": runs}})}
    dsl = found["peak CUDA memory dsl / dense, >= 1e8 weights"]
    assert dsl["value"] == pytest.approx(1.4) and dsl["pass"] is False
    block = found["peak CUDA memory block_dsl / dense, >= 1e8 weights"]
    assert block["value"] == pytest.approx(0.4) and block["pass"] is True


def test_windows_fit_one_epoch_or_span_whole_epochs() -> None:
    assert Plan.of(30, 100, 20, steps_per_epoch=396) == Plan(31, 131, 151)
    assert Plan.of(30, 100, 20, steps_per_epoch=25) == Plan(31, 131, 156)  # 4 and 1 epochs
    assert Plan.of(2, 2, 2, steps_per_epoch=7) == Plan(3, 5, 7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is")
def test_the_marked_tests_take_their_device_from_the_environment() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda",
                           "-p", "no:cacheprovider", "tests/test_fastops.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DSL_TEST_DEVICE": "cuda"})
    assert done.returncode != 0
    assert "DSL_TEST_DEVICE=cuda: torch sees no CUDA device" in done.stdout
