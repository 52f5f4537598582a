"""The Kubernetes manifests pass the schemas of the APIs that apply them (the published KubeRay
and Kubeflow CRDs in ../shared/schemas, and Kubernetes' own for core kinds: see k8s_schema.py),
unknown fields included, launch real modules with overrides that compose into a valid config,
and run a pinned image of this project's version with resource limits, non-root where the API
lets a manifest say so.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from functools import reduce
from operator import getitem
from typing import Any, Iterator

import pytest

pytest.importorskip("jsonschema", reason="optional test dependency (the test extra)")
pytest.importorskip("kubernetes_validate", reason="optional test dependency (the test extra)")
import yaml  # noqa: E402

from conftest import REPO
from k8s_schema import problems, schema_validator, structural, violations
from test_config import load

CLUSTER = REPO / "cluster"
MANIFESTS = sorted(path.name for path in CLUSTER.glob("*.yaml"))
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def manifest(name: str) -> dict[str, Any]:
    (document,) = yaml.safe_load_all((CLUSTER / name).read_text())
    return document


def pod_specs(node: Any) -> Iterator[dict[str, Any]]:
    """Every pod spec (a mapping with `containers`) anywhere in a manifest."""
    if isinstance(node, dict):
        if "containers" in node:
            yield node
        for value in node.values():
            yield from pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from pod_specs(value)


def check_pinned_and_limited(image: str, resources: dict[str, Any]) -> None:
    assert image.endswith(f":{VERSION}-cuda"), image
    limits, requests = resources["limits"], resources["requests"]
    assert {"cpu", "memory"} <= limits.keys() and limits == requests, resources


def check_launch(command: list[str], module: str) -> None:
    """`command` runs `module` and its Hydra overrides compose into a valid job config."""
    start = command.index("-m") + 1
    assert command[start] == module and importlib.util.find_spec(module) is not None
    cfg = load(*command[start + 1:])
    cfg.validate()
    for path in (cfg.data.source, cfg.data.path, cfg.run_dir):
        assert path and path.startswith("/shared/"), f"{path} is not on the shared volume"


def steps(path: str) -> list[str | int]:
    """('spec', 'containers', 0, 'image') for `spec.containers[0].image`."""
    return [int(step) if step.isdigit() else step for step in re.findall(r"[^.\[\]]+", path)]


# Each manifest broken as a hand would: a field misspelt (its last letter doubled), which the API
# server would drop or reject, and a value of the wrong type.
MISSPELT = {
    "networkpolicy.yaml": "spec.podSelector.matchLabels",
    "pytorchjob.yaml":
        "spec.pytorchReplicaSpecs.Worker.template.spec.containers[0].securityContext",
    "rayjob.yaml": "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].image",
    "shared-storage.yaml": "spec.resources.requests",
    "trainjob.yaml": "spec.podSpecOverrides[0].containers[0].volumeMounts",
}
MISTYPED = {
    "networkpolicy.yaml": ("spec.policyTypes", "Ingress"),
    "pytorchjob.yaml": ("spec.runPolicy.backoffLimit", "3"),
    "rayjob.yaml": ("spec.rayClusterSpec.workerGroupSpecs[0].replicas", "2"),
    "shared-storage.yaml": ("spec.accessModes", "ReadWriteMany"),
    "trainjob.yaml": ("spec.trainer.numNodes", "2"),
}


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_the_schema_of_its_api(name: str) -> None:
    assert problems(manifest(name)) == []


@pytest.mark.parametrize("name", MANIFESTS)
def test_schema_rejects_a_misspelt_field_and_a_wrong_type_by_path(name: str) -> None:
    broken = manifest(name)
    *parent, field = steps(MISSPELT[name])
    node = reduce(getitem, parent, broken)
    node[field + field[-1]] = node.pop(field)
    path, value = MISTYPED[name]
    *parent, field = steps(path)
    reduce(getitem, parent, broken)[field] = value
    found = problems(broken)
    assert f"{MISSPELT[name]}{MISSPELT[name][-1]}: unknown field" in found, found
    assert any(problem.startswith(f"{path}: {value!r} is not of type") for problem in found), found


def test_structural_rules_of_the_api_server() -> None:
    """k8s_schema.structural, on the rules the CRDs here use and those they do not use yet."""
    check = schema_validator(structural({"type": "object", "properties": {
        "known": {"type": "object", "properties": {"name": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "port": {"x-kubernetes-int-or-string": True},
        "pod": {"type": "object", "x-kubernetes-embedded-resource": True},
    }}))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}}}
    assert violations(check, {"known": {"name": "a"}, "open": {"any": {"thing": 1}},
                              "port": "http", "pod": pod}) == []
    broken = {"known": {"nam": "a"}, "port": [80], "extra": 1,
              "pod": {"apiVersion": "v1", "metadata": {"labels": {"a": 1}}, "spec": {}}}
    assert violations(check, broken) == [
        "extra: unknown field",
        "known.nam: unknown field",
        "pod.metadata.labels.a: 1 is not of type 'string', 'null'",
        "pod.spec: unknown field",
        "pod: 'kind' is a required property",
        "port: [80] is not valid under any of the given schemas",
    ]


@pytest.mark.parametrize("name", ["rayjob.yaml", "pytorchjob.yaml"])
def test_pods_are_pinned_non_root_and_limited(name: str) -> None:
    pods = list(pod_specs(manifest(name)))
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            check_pinned_and_limited(container["image"], container["resources"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert not mounts or mounts == {"/shared"}


def test_rayjob_runs_the_ray_launcher_on_its_gpu_workers() -> None:
    job = manifest("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    command = shlex.split(job["spec"]["entrypoint"])
    check_launch(command, "dsl_dist.ray_train")
    cfg = load(*command[command.index("-m") + 2:])
    cluster = job["spec"]["rayClusterSpec"]
    pins = (REPO / "requirements-common.txt").read_text()
    assert re.search(rf"^ray\[[a-z,]*\]=={re.escape(cluster['rayVersion'])}$", pins, re.M), \
        f"rayVersion {cluster['rayVersion']} is not the pinned ray"
    (workers,) = cluster["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.ray.use_gpu and cfg.ray.num_workers == workers["replicas"] * gpus
    assert cfg.ray.cpus_per_worker <= float(container["resources"]["limits"]["cpu"])
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_pytorchjob_runs_torchrun_on_master_and_workers() -> None:
    job = manifest("pytorchjob.yaml")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for role in replicas.values():
        (container,) = role["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["command"][0] == "torchrun"
        check_launch(container["command"], "dsl_dist.train")
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert int(job["spec"]["nprocPerNode"]) == gpus


def test_trainjob_runs_the_pytorchjob_launch_on_the_torch_runtime() -> None:
    job = manifest("trainjob.yaml")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    trainer = job["spec"]["trainer"]
    check_launch(trainer["command"], "dsl_dist.train")
    replicas = manifest("pytorchjob.yaml")["spec"]["pytorchReplicaSpecs"]
    assert trainer["command"] == replicas["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert trainer["numNodes"] == sum(role["replicas"] for role in replicas.values())
    check_pinned_and_limited(trainer["image"], trainer["resourcesPerNode"])
    assert trainer["numProcPerNode"] == int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    # The overrides reach the runtime's trainer Job and container, both named `node`.
    (override,) = job["spec"]["podSpecOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    (container,) = override["containers"]
    assert container["name"] == "node"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/shared"}


def test_shared_storage_and_network_policy_cover_the_pods() -> None:
    claim = manifest("shared-storage.yaml")
    claims = {v["persistentVolumeClaim"]["claimName"]
              for name in ("rayjob.yaml", "pytorchjob.yaml", "trainjob.yaml")
              for pod in pod_specs(manifest(name)) for v in pod.get("volumes", [])}
    assert claims == {claim["metadata"]["name"]}
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    policy = manifest("networkpolicy.yaml")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    # (Trainer v2.0's TrainJob cannot label its pods: README.md says what that leaves open.)
    job = manifest("rayjob.yaml")
    templates = [job["spec"]["submitterPodTemplate"],
                 job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
                 *[g["template"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]],
                 *[r["template"] for r in
                   manifest("pytorchjob.yaml")["spec"]["pytorchReplicaSpecs"].values()]]
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items()
