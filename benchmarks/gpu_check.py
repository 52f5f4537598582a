"""The CUDA path in one prepared command, sized for a few minutes of one GPU.

    make gpu-check                    # the wheelhouse's packages (if any), then this script
    python benchmarks/gpu_check.py --gowalla ../shared/data/gowalla [--only train_mf,updates]
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check.json   # CI: tiny, on CPU

One rank (NCCL on cuda:0). It first refuses, in one line, a torch / fbgemm-gpu / torchrec set
that does not belong together (benchmarks/gpu_env.py), then runs its steps, most important
first, each within its own time limit and all within `--budget` seconds:

- plain_loop: BPR-MF as written by hand on TorchRec (benchmarks/plain_torchrec_mf.py) at the
  configured batch and the large one: the yardstick of every throughput below;
- train_mf, train_lightgcn: dense, dsl and block_dsl (d=0.2) on gowalla at both batches:
  samples/s over timed steps between updates (an update runs during warm-up), its ratio to the
  plain loop and to dense; from torch.profiler over further steps, the GPU's busy fraction
  (kernel time / step time), kernel launches and host syncs per step; peak CUDA memory; the
  update's seconds and active weights against the budget (benchmarks/gpu_profile.py);
- updates: one drop-and-grow of each method on a 10^9-weight table (synthetic_table.py) with
  a growth statistic on every row and on 3% of them: seconds, peak memory, and extra memory
  over what was allocated when the update began (table, optimizer and sparsity state);
- unit_tests: the tests marked `cuda`, on the GPU (DSL_TEST_DEVICE=cuda);
- pipeline: dense MF at both batches under each `train.pipeline` variant (if the build has it);
- memory: benchmarks/memory.py's CUDA mode (peak memory at >= 10^8 weights, if it has one).

gpu_check.json is rewritten after every run and step (a step over its limit leaves what it
finished), with a `targets` list (benchmarks/gpu_targets.py) that reads each target off as a
value, its limit and pass/fail; a summary table closes the output. `--only` reruns some steps
into an existing JSON; `--markdown JSON` prints its figures as docs/gpu.md's tables. `--cpu`
runs everything tiny on CPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from gpu_env import installed, mismatch

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "gpu_check.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU rehearsal (CI)")
    parser.add_argument("--out", type=Path, default=RESULT, help=f"default {RESULT}")
    parser.add_argument("--gowalla", type=Path, default=REPO.parent / "shared/data/gowalla",
                        help="gowalla's raw train/test files")
    parser.add_argument("--only", help="a comma-separated subset of the steps, merged into --out")
    parser.add_argument("--budget", type=float, help="seconds for all steps (default: the mode's)")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the figures of a gpu_check.json as docs/gpu.md's tables")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown:
        from gpu_targets import markdown

        print(markdown(json.loads(args.markdown.read_text())))
        return
    versions = installed()
    problem = mismatch(versions["torch"], versions["fbgemm"], versions["torchrec"])
    if problem:
        sys.exit(f"gpu_check: refusing {problem}")
    from gpu_steps import STEPS, child, run_check

    if args.child:
        child(args.child)
        return
    only = args.only.split(",") if args.only else list(STEPS)
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        sys.exit(f"gpu_check: --only {','.join(unknown)}: no such step (steps: "
                 f"{','.join(STEPS)})")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device; run with --cpu for the CPU rehearsal")
    previous = _previous(args.out) if args.only else None
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        result = run_check(args.cpu, args.gowalla, Path(scratch), [s for s in STEPS if s in only],
                           args.out, args.budget, versions, previous)
    sys.exit(0 if result["ok"] else 1)


def _previous(out: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    main()
