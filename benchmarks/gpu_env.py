"""The packages a GPU check runs on: which fbgemm-gpu and torchrec belong to a torch, a wheelhouse
that brings them to a GPU machine without internet, and the refusal of a mismatched set.

GPU images usually come with Python and a CUDA torch and nothing else, often without internet.
On a networked machine, `wheelhouse` downloads (without dependencies, for the GPU machine's
Python version and platform) the CUDA fbgemm-gpu and the torchrec released for its torch, and the
small pure-Python packages such images lack; on the GPU machine, `install` puts them into a
directory for PYTHONPATH with `pip --no-index`, beside the torch already there:

    python benchmarks/gpu_env.py wheelhouse --torch 2.11 --python 3.12 --out wheelhouse
    python benchmarks/gpu_env.py install --wheelhouse wheelhouse --target .gpu-site
    python benchmarks/gpu_env.py check          # the versions seen, or one line refusing them

(`make wheelhouse` and `make gpu-check` run these.) The CUDA build of fbgemm-gpu comes from the
package index pip is set up with (PIP_INDEX_URL chooses another, e.g. PyTorch's cu126 index).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

FBGEMM_OF_TORCH = {"2.5": "1.0", "2.6": "1.1", "2.7": "1.2", "2.8": "1.3", "2.9": "1.4",
                   "2.10": "1.5", "2.11": "1.6", "2.12": "1.7", "2.13": "1.8"}
"""torch release → the fbgemm-gpu release built for it (FBGEMM's release compatibility table:
FBGEMM and TorchRec are released with each PyTorch release and are not guaranteed to work
with an older torch). TorchRec's releases carry the version of the FBGEMM they are tested
with (torchrec 1.6.x ↔ fbgemm-gpu 1.6.x)."""

SMALL_WHEELS = ["hydra-core==1.3.8", "omegaconf==2.3.1", "PyYAML==6.0.4",
                "tensordict==0.15.3", "pyvers==0.2.3", "cloudpickle==3.1.3",
                "pyre-extensions==0.0.32", "typing-inspect==0.9.0", "mypy-extensions==1.2.0"]
"""What `import torchrec` and a training run need beyond torch, numpy, numba, pyarrow and
pytest (the image's own; tests/image rehearses an image without the rest)."""
SOURCE_ONLY = ["antlr4-python3-runtime==4.9.3"]
"""Published as source only (omegaconf's parser runtime): built into a wheel here."""

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def _release(version: str) -> str:
    """major.minor of a version string (2.11.0+cu130 → 2.11)."""
    return ".".join(re.split(r"[.+]", version)[:2])


def installed() -> dict[str, Optional[str]]:
    """The versions installed, read from the packages' metadata (importing a mismatched
    fbgemm-gpu can crash the interpreter)."""
    def version(*names: str) -> Optional[str]:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        return None

    return {"python": platform.python_version(), "torch": version("torch"),
            "fbgemm": version("fbgemm-gpu", "fbgemm-gpu-cpu"), "torchrec": version("torchrec"),
            "numpy": version("numpy"), "numba": version("numba"), "pyarrow": version("pyarrow"),
            "hydra": version("hydra-core"), "tensordict": version("tensordict")}


def mismatch(torch: Optional[str], fbgemm: Optional[str], torchrec: Optional[str]
             ) -> Optional[str]:
    """One line saying why these versions do not belong together, or None when they do."""
    found = f"torch {torch}, fbgemm-gpu {fbgemm}, torchrec {torchrec}"
    missing = [name for name, v in (("torch", torch), ("fbgemm-gpu", fbgemm),
                                     ("torchrec", torchrec)) if v is None]
    if missing:
        return f"{found}: {', '.join(missing)} not installed"
    wanted = FBGEMM_OF_TORCH.get(_release(torch))
    if wanted is None:
        releases = list(FBGEMM_OF_TORCH)
        return (f"{found}: torch {_release(torch)} is not in the compatibility table "
                f"(torch {releases[0]} to {releases[-1]})")
    if _release(fbgemm) != wanted or _release(torchrec) != wanted:
        return (f"{found}: torch {_release(torch)} needs fbgemm-gpu {wanted}.x and "
                f"torchrec {wanted}.x")
    return None


def pip(*args: str) -> None:
    """Runs pip; a failure ends the command with one line (pip has said why above it)."""
    if subprocess.run([sys.executable, "-m", "pip", *args]).returncode:
        sys.exit(f"gpu_env: pip {args[0]} failed (see above)")


def wheelhouse(out: Path, torch: str, python: str) -> None:
    """Downloads into `out` the wheels a GPU machine with `torch` and `python` lacks."""
    release = FBGEMM_OF_TORCH.get(_release(torch))
    if release is None:
        sys.exit(f"gpu_env: torch {torch} is not in the compatibility table "
                 f"({', '.join(FBGEMM_OF_TORCH)})")
    out.mkdir(parents=True, exist_ok=True)
    targets = [f"--platform={p}" for p in PLATFORMS]
    pip("download", "--no-deps", "--only-binary=:all:", f"--python-version={python}",
        "--implementation=cp", *targets, "-d", str(out),
        f"fbgemm-gpu=={release}.*", f"torchrec=={release}.*", *SMALL_WHEELS)
    pip("wheel", "--no-deps", "-w", str(out), *SOURCE_ONLY)


def install(house: Path, target: Path) -> None:
    """Installs every wheel of `house` into `target` (for PYTHONPATH), from nothing else."""
    wheels = sorted(str(w) for w in house.glob("*.whl"))
    if not wheels:
        print(f"gpu_env: no wheels in {house}: using the packages installed")
        return
    pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
        "--target", str(target), *wheels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    house = commands.add_parser("wheelhouse", help="download the wheels (networked machine)")
    house.add_argument("--torch", required=True, help="the GPU machine's torch, e.g. 2.11")
    house.add_argument("--python", default="3.12", help="the GPU machine's Python")
    house.add_argument("--out", type=Path, default=Path("wheelhouse"))
    put = commands.add_parser("install", help="install a wheelhouse (no index)")
    put.add_argument("--wheelhouse", type=Path, default=Path("wheelhouse"))
    put.add_argument("--target", type=Path, default=Path(".gpu-site"))
    commands.add_parser("check", help="print the versions; exit 2 if they do not fit")
    args = parser.parse_args()
    if args.command == "wheelhouse":
        wheelhouse(args.out, args.torch, args.python)
    elif args.command == "install":
        install(args.wheelhouse, args.target)
    else:
        versions = installed()
        print(json.dumps(versions))
        problem = mismatch(versions["torch"], versions["fbgemm"], versions["torchrec"])
        if problem:
            print(f"gpu_env: {problem}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
