"""The GPU check's targets read off its figures, and its closing summary (gpu_check.py).

Each target is a ratio or a figure with its limit and whether it passed (None: not measured in
this check, e.g. a step that did not run), so that gpu_check.json answers each one directly.
"""

from __future__ import annotations

from typing import Any, Optional

PLAIN_RATIO = 0.9
"""Our dense MF against the hand-written TorchRec loop, at each batch size."""
SPARSE_RATIO = 0.95
"""dsl and block_dsl samples/s against dense, per model and batch size."""
BUSY = 0.6
"""GPU busy fraction of MF at the large batch."""
MEMORY_RATIO = {"dsl": 1.3, "block_dsl": 0.5}
"""Training's peak CUDA memory against dense's on a catalogue of at least 10^8 weights."""
UPDATE_SECONDS, UPDATE_TOUCHED, UPDATE_EXTRA_MB = 1.5, 0.03, 2048
"""The 10^9-weight dsl update with 3% of rows touched; its extra memory at 10^9 weights."""


def _target(name: str, value: Optional[float], limit: float, at_most: bool = False
            ) -> dict[str, Any]:
    passed = None if value is None else (value <= limit if at_most else value >= limit)
    return {"target": name, "value": value, "limit": limit,
            "compare": "<=" if at_most else ">=", "pass": passed}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, None where either is missing."""
    return a / b if a is not None and b else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the check from what `result` holds so far."""
    small, large = result["batches"]
    plain = {r["batch"]: r["samples_per_s"] for r in result.get("plain_loop", []) if r["ok"]}
    runs = {(r["model"], r["method"], r["batch"]): r for r in result.get("runs", []) if r["ok"]}

    def speed(model: str, method: str, batch: int) -> Optional[float]:
        run = runs.get((model, method, batch))
        return run["samples_per_s"] if run else None

    found = [_target(f"dense MF / plain TorchRec loop, batch {b}",
                     ratio(speed("mf", "dense", b), plain.get(b)), PLAIN_RATIO)
             for b in (small, large)]
    found += [_target(f"{method} / dense, {model}, batch {b}",
                      ratio(speed(model, method, b), speed(model, "dense", b)), SPARSE_RATIO)
              for model in ("mf", "lightgcn") for method in ("dsl", "block_dsl")
              for b in (small, large)]
    found += [_target(f"GPU busy, {method} MF, batch {large}",
                      runs[("mf", method, large)]["profile"].get("busy_fraction")
                      if ("mf", method, large) in runs else None, BUSY)
              for method in ("dense", "dsl", "block_dsl")]
    memory = {r.get("method"): _peak(r) for r in result.get("memory", {}).get("runs", [])}
    found += [_target(f"peak CUDA memory {method} / dense, >= 1e8 weights",
                      ratio(memory.get(method), memory.get("dense")), limit, at_most=True)
              for method, limit in MEMORY_RATIO.items()]
    updates = {(u["method"], u["touched_rows"]): u for u in result.get("updates", []) if u["ok"]}
    dsl = updates.get(("dsl", UPDATE_TOUCHED), {})
    found.append(_target(f"dsl update of {result['update_weights']:.0e} weights, "
                         f"{UPDATE_TOUCHED:.0%} of rows touched, seconds",
                         dsl.get("seconds"), UPDATE_SECONDS, at_most=True))
    found += [_target(f"dsl update extra memory, touched {touched}, MB",
                      updates.get(("dsl", touched), {}).get("extra_mb"), UPDATE_EXTRA_MB,
                      at_most=True) for touched in (1.0, UPDATE_TOUCHED)]
    return found


def _peak(run: dict[str, Any]) -> Optional[float]:
    """A memory.py run's peak CUDA memory (the largest rank's where it gives one per rank)."""
    peak = run.get("peak_cuda_mb")
    return max(peak) if isinstance(peak, list) and peak else peak


def _cell(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def summary(result: dict[str, Any]) -> str:
    """The short table printed at the end: steps, runs, updates, targets."""
    lines = ["step             status     seconds  note"]
    for name, step in result["steps"].items():
        lines.append(f"{name:<16} {step['status']:<10} {_cell(step.get('seconds'), '8.1f')}"
                     f"  {step.get('note', '')[:60]}")
    lines.append("run                          samples/s  /plain  /dense  busy  syncs/st "
                 "kern/st  peak MB")
    for r in result.get("runs", []) + result.get("pipeline", []):
        name = f"{r['model']} {r['method']} {r['batch']} {r.get('pipeline') or ''}"
        if not r["ok"]:
            lines.append(f"{name:<28} FAILED: {r.get('error', '')[-60:]}")
            continue
        p = r["profile"]
        lines.append(f"{name:<28} {_cell(r['samples_per_s']):>10} {_cell(r['vs_plain'], '6.2f')}"
                     f"  {_cell(r.get('vs_dense'), '6.2f')} {_cell(p.get('busy_fraction'), '5.2f')}"
                     f" {_cell(p.get('syncs_per_step'), '8.1f')}"
                     f" {_cell(p.get('kernels_per_step'), '8.0f')}"
                     f" {_cell(r.get('peak_cuda_mb'), '8.0f')}")
    for u in result.get("updates", []):
        lines.append(f"update {u['method']} touched {u.get('touched_rows')}: "
                     + (f"{u['seconds']:.2f} s, peak {_cell(u.get('peak_cuda_mb'))} MB, "
                        f"extra {_cell(u.get('extra_mb'))} MB" if u["ok"] else "FAILED"))
    for t in result.get("targets", []):
        verdict = {True: "PASS", False: "FAIL", None: "-"}[t["pass"]]
        lines.append(f"{verdict:<4} {t['target']}: {_cell(t['value'], '.3g')} "
                     f"{t['compare']} {t['limit']}")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """docs/gpu.md's figures: the runs and the targets of a gpu_check.json, as tables."""
    m = result["machine"]
    lines = [f"{m['device']}, torch {m['torch']}, fbgemm-gpu {m['fbgemm']}, torchrec "
             f"{m['torchrec']}; plain TorchRec loop: " + ", ".join(
                 f"{r['samples_per_s']:,.0f} samples/s at {r['batch']:,}"
                 for r in result["plain_loop"] if r["ok"]), "",
             "| model | method | batch | samples/s | / plain | / dense | GPU busy | syncs/step "
             "| kernels/step | peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"] + result["pipeline"]:
        if r["ok"]:
            p = r["profile"]
            method = r["method"] + (f" ({r['pipeline']})" if r.get("pipeline") else "")
            lines.append(
                f"| {r['model']} | {method} | {r['batch']:,} | {_cell(r['samples_per_s'])} | "
                f"{_cell(r['vs_plain'], '.2f')} | {_cell(r.get('vs_dense'), '.2f')} | "
                f"{_cell(p.get('busy_fraction'), '.0%')} | {_cell(p.get('syncs_per_step'), '.1f')}"
                f" | {_cell(p.get('kernels_per_step'))} | {_cell(r.get('peak_cuda_mb'))} |")
    lines += ["", "| target | value | limit | pass |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {_cell(t['value'], '.3g')} | {t['compare']} {t['limit']} | "
              f"{({True: 'yes', False: 'no', None: '-'})[t['pass']]} |" for t in result["targets"]]
    return "\n".join(lines)
