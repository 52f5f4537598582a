"""Validate Kubernetes manifests offline, as strictly as the API server they are applied to.

Custom resources (RayJob, PyTorchJob, TrainJob) are checked against the `openAPIV3Schema` of the
published CRDs in ../shared/schemas (its README names their sources), core resources
(PersistentVolumeClaim, NetworkPolicy, ...) against the strict schemas that kubernetes-validate
ships for KUBERNETES_VERSION. Both go through jsonschema, so every problem reads the same way:
the field's path, then what is wrong with it.

A CRD's schema is structural: the API server drops (or, under strict field validation, rejects)
every field it does not declare, while JSON Schema lets unknown fields through unless told
otherwise. `structural` spells the server's rules out for jsonschema. Not checked: CEL rules
(`x-kubernetes-validations`), formats, uniqueness of list-map keys.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any, Iterable, Iterator

import yaml
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource

from conftest import REPO

Schema = dict[str, Any]

SCHEMAS = REPO.parent / "shared" / "schemas"
# The newest Kubernetes release that kubernetes-validate 1.37.0 (pinned in requirements-cpu.txt)
# has schemas for; its -strict variant rejects unknown fields like the CRD schemas below.
KUBERNETES_VERSION = "1.37.0"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


@functools.cache
def definitions() -> Schema:
    """Every definition of the Kubernetes API (core kinds, ObjectMeta, PodSpec, ...)."""
    path = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
            / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json")
    return json.loads(path.read_text())


def ref(name: str) -> Schema:
    return {"$ref": f"{definitions()['$id']}#/$defs/{name}"}


def named_object_meta() -> Schema:
    """A manifest's `metadata`: an ObjectMeta with a name, which `kubectl apply` needs. (A CRD
    declares it as a bare object because the API server checks it itself.)"""
    return {**ref(OBJECT_META), "required": ["name"]}


def structural(schema: Schema) -> Schema:
    """`schema`, changed in place, with the API server's rules for CRD schemas made explicit:
    an object rejects fields it does not declare unless it preserves unknown fields, an
    int-or-string is either, and an embedded resource has an apiVersion, a kind and ObjectMeta."""
    if schema.get("x-kubernetes-int-or-string"):
        schema.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("x-kubernetes-embedded-resource"):
        schema.setdefault("properties", {}).update(
            apiVersion={"type": "string"}, kind={"type": "string"}, metadata=ref(OBJECT_META))
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
    if (schema.get("type") == "object" and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    for child in [*schema.get("properties", {}).values(), *schema.get("anyOf", []),
                  *schema.get("allOf", []), *schema.get("oneOf", [])]:
        structural(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            structural(schema[key])
    return schema


@functools.cache
def custom_resources() -> dict[tuple[str, str], Schema]:
    """The schema of every served version of every CRD in SCHEMAS, by (apiVersion, kind)."""
    crds = sorted(SCHEMAS.glob("*.yaml"))
    if not crds:
        raise FileNotFoundError(f"no CRDs in {SCHEMAS}: ../shared/schemas must sit next to the "
                                "repository, as in CI")
    found: dict[tuple[str, str], Schema] = {}
    for path in crds:
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for version in crd["spec"]["versions"]:
            if version["served"]:
                schema = version["schema"]["openAPIV3Schema"]
                schema["properties"]["metadata"] = named_object_meta()
                api_version = f"{crd['spec']['group']}/{version['name']}"
                found[api_version, crd["spec"]["names"]["kind"]] = structural(schema)
    return found


def core_resource(api_version: str, kind: str) -> Schema:
    """The Kubernetes API's schema of a built-in kind such as networking.k8s.io/v1 NetworkPolicy."""
    group, _, version = api_version.rpartition("/")
    gvk = {"group": group, "version": version, "kind": kind}
    for name, definition in definitions()["$defs"].items():
        if gvk in definition.get("x-kubernetes-group-version-kind", []):
            return {**ref(name), "properties": {"metadata": named_object_meta()}}
    raise LookupError(f"no schema for {api_version} {kind}, neither in {SCHEMAS} nor in "
                      f"Kubernetes {KUBERNETES_VERSION}")


def schema_validator(schema: Schema) -> Draft202012Validator:
    """A validator of `schema`, which may refer to the Kubernetes API's definitions."""
    return Draft202012Validator(schema, registry=Resource.from_contents(definitions()) @ Registry())


@functools.cache
def validator(api_version: str, kind: str) -> Draft202012Validator:
    schema = custom_resources().get((api_version, kind)) or core_resource(api_version, kind)
    return schema_validator(schema)


def problems(manifest: dict[str, Any]) -> list[str]:
    """Every way `manifest` breaks its kind's schema, as `field.path: what is wrong`."""
    return violations(validator(manifest["apiVersion"], manifest["kind"]), manifest)


def violations(validator: Draft202012Validator, instance: Any) -> list[str]:
    return sorted(line for error in validator.iter_errors(instance) for line in describe(error))


def describe(error: ValidationError) -> Iterator[str]:
    """One line per field at fault: jsonschema reports an unknown field on its parent object."""
    if error.validator == "additionalProperties" and error.validator_value is False:
        for name in sorted(set(error.instance) - set(error.schema.get("properties", {}))):
            yield f"{field_path([*error.absolute_path, name])}: unknown field"
    else:
        yield f"{field_path(error.absolute_path) or '(the manifest)'}: {error.message}"


def field_path(steps: Iterable[str | int]) -> str:
    """`spec.containers[0].image` for ('spec', 'containers', 0, 'image')."""
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")
