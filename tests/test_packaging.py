"""The dependency pins agree: pyproject.toml (its test extra too), the CPU and GPU requirement
sets and the Dockerfile name the same versions, and the Dockerfile installs the set of its
variant."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import REPO


def requirements(name: str) -> dict[str, Requirement]:
    """The requirements of a file, following `-r` includes, by normalised name."""
    found: dict[str, Requirement] = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            found.update(requirements(line[3:].strip()))
        elif line:
            requirement = Requirement(line)
            found[requirement.name.lower()] = requirement
    return found


def pinned(requirement: Requirement) -> str:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement} is not pinned"
    return spec.version


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PYPROJECT = {Requirement(r).name.lower(): Requirement(r) for r in PROJECT["dependencies"]}
TEST_EXTRA = [Requirement(r) for r in PROJECT["optional-dependencies"]["test"]]
CPU = {**requirements("requirements-cpu.txt"), **requirements("requirements-cpu-nodeps.txt")}
CUDA = requirements("requirements-cuda.txt")


@pytest.mark.parametrize("name", sorted(PYPROJECT))
def test_pyproject_and_the_gpu_set_agree(name: str) -> None:
    assert name in CUDA, f"{name} missing from requirements-cuda.txt"
    assert PYPROJECT[name].specifier.contains(pinned(CUDA[name])), (PYPROJECT[name], CUDA[name])
    assert PYPROJECT[name].extras == CUDA[name].extras


def test_cpu_set_pins_the_same_versions_with_the_cpu_fbgemm() -> None:
    for name, requirement in CUDA.items():
        cpu_name = "fbgemm-gpu-cpu" if name == "fbgemm-gpu" else name
        assert pinned(CPU[cpu_name]) == pinned(requirement), name
    assert "fbgemm-gpu" not in CPU, "the CUDA fbgemm-gpu does not load on a CPU torch"
    assert pinned(CPU["torchrec"]) == pinned(CPU["fbgemm-gpu-cpu"])


def test_cpu_set_pins_the_test_extra() -> None:
    """`make test` installs requirements-cpu.txt, not the extra: they must name the same pins."""
    for requirement in TEST_EXTRA:
        assert pinned(CPU[requirement.name.lower()]) == pinned(requirement), requirement


def test_dockerfile_installs_its_variant_and_runs_unprivileged() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    variants = set(re.findall(r"^FROM \S+ AS base-(\w+)$", dockerfile, re.MULTILINE))
    assert variants == {"cuda", "cpu"}
    assert re.search(r"^ARG VARIANT=cuda$", dockerfile, re.MULTILINE)
    assert "pip install -r requirements-${VARIANT}.txt" in dockerfile
    copied = set(re.findall(r"requirements-[\w-]+\.txt", dockerfile))
    assert {f"requirements-{v}.txt" for v in variants} | {"requirements-common.txt"} <= copied
    assert all((REPO / name).exists() for name in copied)
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("0", "root")
