"""Schema validation for the offline manifest tests (tests/test_k8s_manifests*.py).

- RayCluster / RayJob against the vendored KubeRay CRDs (k8s/schemas/kuberay/), v1
  ``openAPIV3Schema`` made strict: ``additionalProperties: false`` on every object schema
  with ``properties`` and no ``x-kubernetes-preserve-unknown-fields``;
- built-in kinds with ``kubernetes-validate`` (strict) for KUBERNETES_VERSION.

What no schema says is in tests/k8s_checks.py. Not a test module (no ``test_`` prefix).
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.k8s_kustomize import K8S, ROOT, Object, where

CRD_DIR = K8S / "schemas" / "kuberay"
SHARED_CRD_DIR = ROOT.parent / "shared" / "k8s-schemas" / "kuberay"  # the team copy, when present
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
KUBERNETES_VERSION = "1.33.0"  # ships offline with kubernetes-validate (test_k8s_manifests.py checks it)

_yaml_loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def make_strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Close every object schema that lists its properties (structural schemas only)."""
    strict = dict(schema)
    if "properties" in strict:
        strict["properties"] = {name: make_strict(sub) for name, sub in strict["properties"].items()}
        if not strict.get("x-kubernetes-preserve-unknown-fields"):
            strict.setdefault("additionalProperties", False)
    if isinstance(strict.get("items"), dict):
        strict["items"] = make_strict(strict["items"])
    if isinstance(strict.get("additionalProperties"), dict):
        strict["additionalProperties"] = make_strict(strict["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in strict:
            strict[key] = [make_strict(sub) for sub in strict[key]]
    if isinstance(strict.get("not"), dict):
        strict["not"] = make_strict(strict["not"])
    return strict


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=_yaml_loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def crd_validator(kind: str, strict: bool = True) -> jsonschema.protocols.Validator:
    schema = crd_schema(kind)
    if strict:
        schema = make_strict(schema)
    # OpenAPI v3 schemas are draft-4 style (boolean exclusiveMinimum); unknown x-kubernetes-*
    # keywords are ignored by jsonschema.
    return jsonschema.Draft4Validator(schema)


def crd_errors(obj: Object, strict: bool = True) -> list[str]:
    validator = crd_validator(obj["kind"], strict)
    return [
        f"{where(obj)}: {'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def builtin_errors(obj: Object) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where(obj)}: {'.'.join(map(str, error.path))}: {error.message}"]
    return []
