"""CI has no GPU, so the selection tests run a second time with DSL_DEVICE_PATH=torch: CPU
tensors then take the torch branch a GPU takes (fastops.host_path), and a layout, dtype or
view mistake there fails here (unpack_bits' non-contiguous result once failed only on CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

SELECTION_TESTS = ["tests/test_fastops.py", "tests/test_selection.py", "tests/test_streaming.py"]


def test_selection_tests_pass_on_the_forced_device_path() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *SELECTION_TESTS], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "DSL_DEVICE_PATH": "torch"})
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout.splitlines()[-1]
