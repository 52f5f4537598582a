"""CI has no GPU, so every `cuda`-marked test runs a second time with DSL_DEVICE_PATH=torch:
CPU tensors then take the torch branch a GPU takes (fastops.host_path), and a layout, dtype or
view mistake there fails here (unpack_bits' non-contiguous result once failed only on CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_cuda_marked_tests_pass_on_the_forced_device_path() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", "cuda", "tests/"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "DSL_DEVICE_PATH": "torch"})
    assert done.returncode == 0, done.stdout[-3000:]
    summary = done.stdout.splitlines()[-1]
    assert " passed" in summary and " failed" not in summary, summary
