"""Offline validation of the Kubernetes manifests (k8s/) and the training image (Dockerfile).

No cluster, kubectl or kustomize binary is needed. ``build()`` below is a small
kustomize loader for the subset the manifests use (see k8s/README.md): ``resources``,
``images`` and ``patches`` with a ``target`` and a JSON6902 operation list. Every other
kustomization field is rejected, so an overlay that uses one fails here instead of being
half-built. The base and every overlay are built and checked:

- RayCluster / RayJob against the vendored KubeRay CRDs (k8s/schemas/kuberay/), v1
  ``openAPIV3Schema`` made strict: ``additionalProperties: false`` on every object schema
  with ``properties`` and no ``x-kubernetes-preserve-unknown-fields``;
- built-in kinds with ``kubernetes-validate`` (strict) for KUBERNETES_VERSION;
- what no schema says: resources and non-root security contexts, pinned images, the
  RayJob entry point, the Ray version, GPUs per overlay, shared storage, Secrets.

The last tests mutate valid objects to show each check fails when it should.
"""

from __future__ import annotations
import __future__

import argparse
import ast
import configparser
import copy
import functools
import importlib.metadata
import json
import math
import re
import shlex
import subprocess
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD_DIR = K8S / "schemas" / "kuberay"
SHARED_CRD_DIR = ROOT.parent / "shared" / "k8s-schemas" / "kuberay"  # the team copy, when present
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
KUBERNETES_VERSION = "1.33.0"  # ships offline with kubernetes-validate (checked below)
BUILDS = {"base": K8S / "base", "cpu-smoke": K8S / "overlays" / "cpu-smoke",
          "multi-gpu": K8S / "overlays" / "multi-gpu"}
RUNNER = ROOT / "rec_dist" / "tune" / "ray_train.py"  # what jobs/train.py and jobs/evaluate.py run
SHARED_MOUNT = "/mnt/shared"
SHARED_PVC = "rec-dist-shared"
APP_DIR = "/app"  # WORKDIR of the training image = the RayJob's working_dir
GPU = "nvidia.com/gpu"
CONTAINER_LISTS = ("containers", "initContainers")
LIGHTNING_KEYS = ("--trainer.", "--model.", "--data.", "--seed_everything")

Object = dict[str, Any]

_yaml_loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---- a minimal kustomize ---------------------------------------------------------------------
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "images", "patches"}
PATCH_FIELDS = {"path", "patch", "target"}
TARGET_FIELDS = {"group", "version", "kind", "name"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}


def build(directory: Path) -> list[Object]:
    """The objects ``kustomize build directory`` would output, for the supported subset."""
    kfile = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(kfile.read_text()) or {}
    unsupported = set(kustomization) - KUSTOMIZATION_FIELDS
    if unsupported:
        raise ValueError(f"{kfile}: fields {sorted(unsupported)} are outside the supported subset "
                         f"{sorted(KUSTOMIZATION_FIELDS)} (see k8s/README.md)")
    objects: list[Object] = []
    for entry in kustomization.get("resources", []):
        if "://" in entry:
            raise ValueError(f"{kfile}: remote resource {entry!r} is not supported")
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(build(path))
        elif path.is_file():
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
        else:
            raise FileNotFoundError(f"{kfile}: resource {entry!r} does not exist")
    for patch in kustomization.get("patches", []):
        objects = apply_patch(directory, patch, objects)
    for image in kustomization.get("images", []):
        if set(image) - IMAGE_FIELDS or "name" not in image:
            raise ValueError(f"{kfile}: images entry {image} (supported: {sorted(IMAGE_FIELDS)})")
        for obj in objects:
            set_image(obj, image)
    seen = set()
    for obj in objects:
        ident = (obj.get("apiVersion"), obj.get("kind"), obj.get("metadata", {}).get("name"))
        if ident in seen:
            raise ValueError(f"{kfile}: {ident} is defined twice")
        seen.add(ident)
    return objects


def group_version(obj: Object) -> tuple[str, str]:
    api_version = obj.get("apiVersion", "")
    group, _, version = api_version.rpartition("/")
    return group, version


def matches(obj: Object, target: dict[str, str]) -> bool:
    group, version = group_version(obj)
    actual = {"group": group, "version": version, "kind": obj.get("kind"),
              "name": obj.get("metadata", {}).get("name")}
    return all(actual[key] == value for key, value in target.items())


def apply_patch(directory: Path, patch: dict[str, Any], objects: list[Object]) -> list[Object]:
    """Apply one JSON6902 patch to every object its target selects (at least one)."""
    if set(patch) - PATCH_FIELDS or "target" not in patch or ("path" in patch) == ("patch" in patch):
        raise ValueError(f"{directory}: patch {patch} needs a target and exactly one of path/patch")
    target = patch["target"]
    if set(target) - TARGET_FIELDS:
        raise ValueError(f"{directory}: patch target {target}: supported selectors are {sorted(TARGET_FIELDS)}")
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list) or not all(isinstance(op, dict) and "op" in op for op in operations):
        raise ValueError(f"{directory}: patch {patch.get('path', '(inline)')} is not a JSON6902 operation list "
                         "(strategic-merge patches are not supported)")
    json_patch = jsonpatch.JsonPatch(operations)
    selected = [i for i, obj in enumerate(objects) if matches(obj, target)]
    if not selected:
        raise ValueError(f"{directory}: patch target {target} selects no object")
    patched = list(objects)
    for i in selected:
        patched[i] = json_patch.apply(objects[i])
    return patched


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``registry/name:tag@digest`` -> (name, tag, digest); a ':' before the last '/' is a port."""
    name, _, digest = image.partition("@")
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def containers_of(tree: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container of every pod template anywhere in ``tree`` (custom resources too)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in CONTAINER_LISTS and isinstance(value, list):
                for i, container in enumerate(value):
                    yield f"{path}.{key}[{i}]", container
            else:
                yield from containers_of(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from containers_of(value, f"{path}[{i}]")


def pod_specs(tree: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec (a mapping with a ``containers`` list) anywhere in ``tree``."""
    if isinstance(tree, dict):
        if isinstance(tree.get("containers"), list):
            yield path, tree
            return
        for key, value in tree.items():
            yield from pod_specs(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from pod_specs(value, f"{path}[{i}]")


def set_image(obj: Object, image: dict[str, str]) -> None:
    """kustomize's images transformer: rewrite matching images in every container list."""
    for _, container in containers_of(obj):
        if "image" not in container:
            continue
        name, tag, digest = split_image(container["image"])
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
            continue
        tag = image.get("newTag", tag)
        container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


@functools.cache
def built(name: str) -> tuple[Object, ...]:
    return tuple(build(BUILDS[name]))


def objects_of(name: str) -> list[Object]:
    """A private copy of a build (tests may mutate it)."""
    return copy.deepcopy(list(built(name)))


def of_kind(objects: list[Object], kind: str) -> list[Object]:
    return [obj for obj in objects if obj.get("kind") == kind]


def where(obj: Object) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---- schemas ---------------------------------------------------------------------------------
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
    return [f"{where(obj)}: {'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def builtin_errors(obj: Object) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where(obj)}: {'.'.join(map(str, error.path))}: {error.message}"]
    return []


# ---- checks a schema cannot express (each returns a list of problems) ------------------------
def quantity(value: Any) -> float:
    """A Kubernetes CPU/count quantity as a number ("500m" -> 0.5, "8" -> 8)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def resource_problems(objects: list[Object]) -> list[str]:
    problems = []
    for obj in objects:
        for path, container in containers_of(obj):
            resources = container.get("resources") or {}
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (resources.get(section) or {}):
                        problems.append(f"{where(obj)}{path} ({container.get('name')}): no {section}.{resource}")
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            if GPU in requests or GPU in limits:
                if requests.get(GPU) != limits.get(GPU):
                    problems.append(f"{where(obj)}{path}: {GPU} requests != limits")
    return problems


def security_problems(objects: list[Object]) -> list[str]:
    problems = []
    for obj in objects:
        for pod_path, pod in pod_specs(obj):
            pod_context = pod.get("securityContext") or {}
            for key in CONTAINER_LISTS:
                for i, container in enumerate(pod.get(key) or []):
                    context = container.get("securityContext") or {}
                    at = f"{where(obj)}{pod_path}.{key}[{i}] ({container.get('name')})"
                    if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
                        problems.append(f"{at}: runAsNonRoot is not true")
                    uid = context.get("runAsUser", pod_context.get("runAsUser"))
                    if not isinstance(uid, int) or uid == 0:
                        problems.append(f"{at}: runAsUser must be a non-zero uid, got {uid!r}")
                    if context.get("allowPrivilegeEscalation") is not False:
                        problems.append(f"{at}: allowPrivilegeEscalation is not false")
                    if context.get("privileged"):
                        problems.append(f"{at}: privileged")
    return problems


def image_problems(images: list[tuple[str, str]]) -> list[str]:
    """``(where, image)`` pairs: every image needs a pinned tag (or a digest), never ``latest``."""
    problems = []
    for at, image in images:
        if not image:
            problems.append(f"{at}: no image")
            continue
        _, tag, digest = split_image(image)
        if digest is None and tag is None:
            problems.append(f"{at}: image {image!r} has no tag")
        elif tag == "latest":
            problems.append(f"{at}: image {image!r} uses the latest tag")
    return problems


def manifest_images(objects: list[Object]) -> list[tuple[str, str]]:
    return [(f"{where(obj)}{path}", container.get("image", "")) for obj in objects
            for path, container in containers_of(obj)]


def dockerfile_lines(path: Path) -> list[str]:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    return lines


def dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for line in dockerfile_lines(path):
        if line.startswith("ARG ") and "=" in line:
            key, value = line[4:].split("=", 1)
            args[key.strip()] = value.strip()
    return args


def dockerfile_from_images(path: Path) -> list[tuple[str, str]]:
    return [(f"{path.relative_to(ROOT)}: {line}", line.split()[1]) for line in dockerfile_lines(path)
            if line.startswith("FROM ")]


def ray_clusters(objects: list[Object]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, RayCluster spec)``: RayClusters and clusters a RayJob creates itself."""
    specs = [(where(obj), obj["spec"]) for obj in of_kind(objects, "RayCluster")]
    specs += [(where(obj), obj["spec"]["rayClusterSpec"]) for obj in of_kind(objects, "RayJob")
              if "rayClusterSpec" in obj["spec"]]
    return specs


def ray_pods(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(role, group spec, pod spec)`` of the head and each worker group."""
    pods = [("head", cluster["headGroupSpec"], cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(f"worker group {group['groupName']}", group, group["template"]["spec"])
             for group in cluster.get("workerGroupSpecs", [])]
    return pods


@functools.cache
def runner_parse_args() -> Callable[..., tuple[argparse.Namespace, list[str]]]:
    """``parse_args`` of rec_dist/tune/ray_train.py: the options the jobs/ entry points accept.

    Importing that module pulls in Lightning and MLflow (seconds, more on a busy machine),
    so the function's own definition is compiled alone; it needs only argparse.
    """
    tree = ast.parse(RUNNER.read_text())
    (function,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "parse_args"]
    namespace: dict[str, Any] = {"argparse": argparse, "Sequence": Sequence}
    code = compile(ast.Module(body=[function], type_ignores=[]), str(RUNNER), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    return namespace["parse_args"]


def parse_entrypoint(entrypoint: str) -> tuple[str, argparse.Namespace, list[str]]:
    """``python jobs/x.py ...`` -> (script, runner options, Lightning CLI arguments)."""
    argv = shlex.split(entrypoint)
    if len(argv) < 2 or argv[0] not in ("python", "python3"):
        raise ValueError(f"entry point {entrypoint!r} is not `python jobs/<name>.py ...`")
    script = ROOT / argv[1]
    if not script.is_file():
        raise ValueError(f"{argv[1]} does not exist")
    source = script.read_text()
    if re.search(r"from rec_dist\.tune\.ray_train import main\b", source):
        stage = "fit"
    elif re.search(r"from rec_dist\.tune\.ray_train import evaluate_main\b", source):
        stage = "eval"
    else:
        raise ValueError(f"{argv[1]} does not run rec_dist.tune.ray_train's main/evaluate_main: "
                         "teach this test its options")
    args, cli_args = runner_parse_args()(argv[2:], "k8s manifest check", stage=stage)
    return argv[1], args, cli_args


def entrypoint_problems(objects: list[Object]) -> list[str]:
    problems = []
    clusters = {obj["metadata"]["name"]: obj["spec"] for obj in of_kind(objects, "RayCluster")}
    for job in of_kind(objects, "RayJob"):
        at, spec = where(job), job["spec"]
        entrypoint = spec.get("entrypoint", "")
        if re.search(r"[;&|`<>]|\$\(", entrypoint):
            problems.append(f"{at}: the entry point must be one command (KubeRay runs what follows `&&`, "
                            f"`;` or `|` in the submitter pod): {entrypoint!r}")
            continue
        try:
            script, args, cli_args = parse_entrypoint(entrypoint)
        except (ValueError, SystemExit) as error:
            problems.append(f"{at}: entry point {entrypoint!r} rejected: {error}")
            continue
        if not re.fullmatch(r"jobs/\w+\.py", script) or not (ROOT / script).is_file():
            problems.append(f"{at}: entry point script {script!r} is not a file in jobs/")
        config = Path(args.config)
        if config.is_absolute() or config.parts[0] != "configs" or not (ROOT / config).is_file():
            problems.append(f"{at}: --config {args.config!r} is not a file in configs/")
        for arg in cli_args:
            if arg.startswith("-") and not arg.startswith(LIGHTNING_KEYS):
                problems.append(f"{at}: {arg!r} is neither a runner option nor a Lightning CLI key")
        if not str(args.storage_path or "").startswith(SHARED_MOUNT + "/"):
            problems.append(f"{at}: --storage_path {args.storage_path!r} is not on the shared volume {SHARED_MOUNT}")
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        if runtime_env.get("working_dir") != APP_DIR:
            problems.append(f"{at}: runtimeEnvYAML working_dir must be the image's {APP_DIR}")
        # the cluster it runs on, and whether that cluster can hold its Ray Train workers
        if "rayClusterSpec" in spec:
            cluster = spec["rayClusterSpec"]
        else:
            cluster = clusters.get((spec.get("clusterSelector") or {}).get("ray.io/cluster"))
            if cluster is None:
                problems.append(f"{at}: clusterSelector {spec.get('clusterSelector')} names no RayCluster of the build")
                continue
        slots, gpus = 0, 0
        for role, group, pod in ray_pods(cluster):
            if role == "head":
                continue
            limits = pod["containers"][0]["resources"]["limits"]  # Ray runs in the first container
            per_pod = math.floor(quantity(limits["cpu"]) / args.cpus_per_worker)
            gpu = int(limits.get(GPU, 0))
            if args.use_gpu:
                per_pod = min(per_pod, gpu)
            slots += per_pod * int(group.get("replicas", 1))
            gpus += gpu * int(group.get("replicas", 1))
        if args.num_workers > slots:
            problems.append(f"{at}: --num_workers {args.num_workers} (x {args.cpus_per_worker} CPU"
                            f"{', 1 GPU' if args.use_gpu else ''}) but the worker groups hold {slots}")
        if args.use_gpu != (gpus > 0):
            problems.append(f"{at}: --use_gpu is {args.use_gpu} but the worker groups have {gpus} GPUs")
    return problems


def secret_refs(objects: list[Object]) -> set[tuple[str, str | None]]:
    """``(secret name, key)`` of every secretKeyRef; key None for whole-Secret references."""
    refs: set[tuple[str, str | None]] = set()

    def walk(tree: Any) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                if key == "secretKeyRef":
                    refs.add((value["name"], value["key"]))
                elif key == "secretRef":
                    refs.add((value["name"], None))
                elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                    refs.add((value["secretName"], None))
                else:
                    walk(value)
        elif isinstance(tree, list):
            for value in tree:
                walk(value)

    walk(objects)
    return refs


def documented_secrets(readme: str) -> dict[str, set[str]]:
    """Secrets (and their keys) created by ``kubectl create secret generic`` commands in a README."""
    commands = re.sub(r"\\\n\s*", " ", readme)
    documented: dict[str, set[str]] = {}
    for line in commands.splitlines():
        match = re.search(r"kubectl create secret generic ([a-z0-9][-a-z0-9.]*)", line)
        if match:
            keys = re.findall(r"--from-(?:literal|file)=([-._a-zA-Z0-9]+)=", line)
            documented.setdefault(match.group(1), set()).update(keys)
    return documented


def secret_problems(objects: list[Object], readme: str) -> list[str]:
    documented = documented_secrets(readme)
    problems = []
    for name, key in sorted(secret_refs(objects), key=str):
        if name not in documented:
            problems.append(f"Secret {name!r} is referenced but k8s/README.md does not show how to create it")
        elif key is not None and key not in documented[name]:
            problems.append(f"Secret {name!r}: key {key!r} is referenced but not in its kubectl command")
    return problems


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


# ---- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(pyproject: dict[str, Any], package: str) -> Requirement:
    (requirement,) = [Requirement(dep) for dep in pyproject["project"]["dependencies"]
                      if Requirement(dep).name == package]
    return requirement


def test_vendored_crds_are_the_recorded_copies():
    """The vendored CRDs hash to what their origin note records, and equal the shared copy where one exists."""
    import hashlib
    import re

    assert set(CRD_FILES.values()) <= {p.name for p in CRD_DIR.iterdir()}
    note = (CRD_DIR / "README.md").read_text()
    recorded = dict((name, digest) for digest, name in re.findall(r"([0-9a-f]{64})\s+(\S+\.yaml)", note))
    for name in CRD_FILES.values():
        assert hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() == recorded.get(name), (
            f"{name}: not the copy recorded in k8s/schemas/kuberay/README.md")
        shared = SHARED_CRD_DIR / name
        if shared.is_file():  # next to the team's shared folder (a clean clone elsewhere has none)
            assert (CRD_DIR / name).read_bytes() == shared.read_bytes(), f"{name}: not the shared copy"


def test_kubernetes_version_ships_offline():
    versions = kubernetes_validate.utils.all_versions()
    assert KUBERNETES_VERSION in versions, f"kubernetes-validate ships {versions}"


@pytest.mark.parametrize("name", BUILDS)
def test_build_has_every_component(name):
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in built(name)}
    assert kinds == {
        ("PersistentVolumeClaim", SHARED_PVC), ("Service", "postgres"), ("StatefulSet", "postgres"),
        ("ConfigMap", "mlflow-config"), ("Service", "mlflow"), ("Deployment", "mlflow"),
        ("RayCluster", "rec-dist"), ("RayJob", "rec-dist-train"),
    }


@pytest.mark.parametrize("name", BUILDS)
def test_kuberay_objects_match_the_strict_crd_schemas(name):
    objects = [obj for obj in built(name) if obj["kind"] in CRD_FILES]
    assert {obj["kind"] for obj in objects} == set(CRD_FILES)
    for obj in objects:
        assert group_version(obj) == ("ray.io", "v1"), where(obj)
    assert [e for obj in objects for e in crd_errors(obj)] == []
    # what the operator checks at run time (utils/validation.go): DNS-1035 names, 53 characters for a
    # RayCluster (its longest Service suffix must fit in 63), 53 - 6 for a RayJob (it may name a cluster)
    for obj in objects:
        name = obj["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), where(obj)
        assert len(name) <= (53 if obj["kind"] == "RayCluster" else 47), where(obj)


@pytest.mark.parametrize("name", BUILDS)
def test_builtin_objects_pass_kubernetes_validate_strict(name):
    objects = [obj for obj in built(name) if obj["kind"] not in CRD_FILES]
    for obj in objects:  # a kind without a schema would only warn: make sure each one has one
        try:
            kubernetes_validate.validate({"apiVersion": obj["apiVersion"], "kind": obj["kind"]},
                                         KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where(obj)}: no schema for {obj['apiVersion']} in Kubernetes {KUBERNETES_VERSION}")
        except kubernetes_validate.ValidationError:
            pass
    assert [e for obj in objects for e in builtin_errors(obj)] == []


@pytest.mark.parametrize("name", BUILDS)
def test_every_container_has_resources_and_runs_as_non_root(name):
    objects = objects_of(name)
    assert len(list(containers_of(objects))) >= 5
    assert resource_problems(objects) == []
    assert security_problems(objects) == []


@pytest.mark.parametrize("name", BUILDS)
def test_images_are_pinned(name):
    assert image_problems(manifest_images(objects_of(name))) == []


def test_dockerfile_base_images_are_pinned():
    images = dockerfile_from_images(ROOT / "Dockerfile") + dockerfile_from_images(K8S / "mlflow" / "Dockerfile")
    assert len(images) == 2
    assert image_problems(images) == []
    for _, image in images:  # a full version, not a moving minor tag
        assert re.search(r":v?\d+\.\d+\.\d+", image), image


@pytest.mark.parametrize("name", BUILDS)
def test_rayjob_entrypoint_runs_a_job_and_config_of_this_repo(name):
    objects = objects_of(name)
    assert len(of_kind(objects, "RayJob")) == 1
    assert entrypoint_problems(objects) == []


def test_ray_version_is_the_pinned_one(pyproject):
    installed = importlib.metadata.version("ray")
    ray_pin = pinned(pyproject, "ray")
    assert ray_pin.specifier.contains(installed), f"installed ray {installed} vs pyproject {ray_pin}"
    docker_ray = dockerfile_args(ROOT / "Dockerfile")["RAY_VERSION"]
    assert docker_ray == installed
    for name in BUILDS:
        clusters = ray_clusters(objects_of(name))
        assert clusters
        for at, cluster in clusters:
            assert cluster["rayVersion"] == installed, f"{name} {at}: rayVersion {cluster['rayVersion']}"
            assert ray_pin.specifier.contains(cluster["rayVersion"])
        for at, image in manifest_images(objects_of(name)):
            if split_image(image)[0] == "ghcr.io/rec-dist/rec-dist":  # the tag names the Ray it carries
                _, tag, _ = split_image(image)
                assert tag.startswith(f"{pyproject['project']['version']}-ray{installed}-"), f"{at}: {image}"


def test_dockerfile_installs_like_make_install(pyproject):
    dockerfile = ROOT / "Dockerfile"
    args = dockerfile_args(dockerfile)
    text = " ".join(dockerfile_lines(dockerfile))
    makefile = (ROOT / "Makefile").read_text()
    assert Requirement(f"torch=={args['TORCH_VERSION']}") == pinned(pyproject, "torch")
    assert f"torch=={args['TORCH_VERSION']}" in makefile
    assert f"--no-deps torchrec=={args['TORCHREC_VERSION']}" in makefile
    assert 'pip install --no-deps "torchrec==${TORCHREC_VERSION}"' in text
    assert 'pip install ".[${VARIANT}]"' in text
    assert args["VARIANT"] in ("cpu", "gpu") and {"cpu", "gpu"} <= set(pyproject["project"]["optional-dependencies"])
    assert "WORKDIR " + APP_DIR in dockerfile_lines(dockerfile)
    users = [line.split()[1] for line in dockerfile_lines(dockerfile) if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert args["USER_UID"] != "0"
    # .dockerignore keeps every path the Dockerfile copies
    allowed = {line.strip()[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip().startswith("!")}
    copied = [src for line in dockerfile_lines(dockerfile) if line.startswith("COPY ")
              for src in line.split()[1:-1] if not src.startswith("--")]
    assert copied and set(copied) <= allowed, set(copied) - allowed
    assert {"jobs", "configs"} <= set(copied)


def test_mlflow_server_image_matches_the_mlflow_pin(pyproject):
    dockerfile = K8S / "mlflow" / "Dockerfile"
    ((_, base),) = dockerfile_from_images(dockerfile)
    server_version = split_image(base)[1].lstrip("v")
    assert f'"mlflow=={server_version}"' in dockerfile.read_text()
    assert pinned(pyproject, "mlflow").specifier.contains(server_version)
    for name in BUILDS:
        (deployment,) = [obj for obj in built(name) if where(obj) == "Deployment/mlflow"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert split_image(container["image"])[1] == server_version


@pytest.mark.parametrize("name", BUILDS)
def test_mlflow_server_postgres_s3_and_basic_auth(name):
    objects = objects_of(name)
    by_id = {where(obj): obj for obj in objects}
    (container,) = by_id["Deployment/mlflow"]["spec"]["template"]["spec"]["containers"]
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "mlflow server" in script and "--app-name basic-auth" in script
    assert '--artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}"' in script
    assert "--serve-artifacts" in script
    postgres_port = by_id["Service/postgres"]["spec"]["ports"][0]["port"]
    assert f"postgresql+psycopg2://${{PG_USER}}:${{PG_PASSWORD}}@postgres:{postgres_port}/mlflow" in script
    assert '--backend-store-uri "${DB_URI}"' in script and "database_uri = ${DB_URI}" in script
    config = by_id["ConfigMap/mlflow-config"]["data"]
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert re.match(r"https?://", config["MLFLOW_S3_ENDPOINT_URL"])
    assert {ref["configMapRef"]["name"] for ref in container["envFrom"]} == {"mlflow-config"}
    env = env_of(container)
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PG_USER", "PG_PASSWORD",
                     "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[variable].get("valueFrom", {}), variable
    # the Ray pods log to this server, authenticated
    service = by_id["Service/mlflow"]
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert container["ports"][0]["containerPort"] == 5000 and "--port 5000" in script
    for _, cluster in ray_clusters(objects):
        for role, _, pod in ray_pods(cluster):
            ray_env = env_of(pod["containers"][0])
            assert ray_env["MLFLOW_TRACKING_URI"]["value"] == uri, role
            for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert "secretKeyRef" in ray_env[variable]["valueFrom"], (role, variable)


def test_mlflow_start_script_writes_the_auth_config_and_starts_the_server(tmp_path):
    """Run the container's shell script with a stub ``mlflow`` that records its arguments."""
    (deployment,) = [obj for obj in built("base") if where(obj) == "Deployment/mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-c"] and len(container["args"]) == 1
    script = container["args"][0].replace("/tmp/mlflow", str(tmp_path / "home"))
    stub = tmp_path / "bin" / "mlflow"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$STUB_ARGS"\n')
    stub.chmod(0o755)
    config = next(obj for obj in built("base") if where(obj) == "ConfigMap/mlflow-config")["data"]
    env = {**config, "PATH": f"{stub.parent}:/usr/bin:/bin", "STUB_ARGS": str(tmp_path / "args"),
           "PG_USER": "mlflow", "PG_PASSWORD": "0123abcd"}
    subprocess.run(["/bin/sh", "-c", script], env=env, check=True, timeout=30)
    uri = "postgresql+psycopg2://mlflow:0123abcd@postgres:5432/mlflow"
    args = (tmp_path / "args").read_text().splitlines()
    assert args[0] == "server"
    options: dict[str, str | None] = {}
    for i, arg in enumerate(args[1:], start=1):
        if arg.startswith("--"):
            following = args[i + 1] if i + 1 < len(args) else "--"
            options[arg] = None if following.startswith("--") else following
    assert "--serve-artifacts" in options and options["--serve-artifacts"] is None
    assert options["--backend-store-uri"] == uri
    assert options["--artifacts-destination"] == config["MLFLOW_ARTIFACTS_DESTINATION"]
    assert options["--app-name"] == "basic-auth"
    assert options["--allowed-hosts"] == config["MLFLOW_SERVER_ALLOWED_HOSTS"]
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "home" / "basic_auth.ini")
    assert ini["mlflow"]["database_uri"] == uri
    assert ini["mlflow"]["default_permission"] == config["MLFLOW_AUTH_DEFAULT_PERMISSION"]
    assert env_of(container)["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/tmp/mlflow/basic_auth.ini"
    assert (tmp_path / "home" / "basic_auth.ini").stat().st_mode & 0o077 == 0  # holds the DB password


@pytest.mark.parametrize("name", BUILDS)
def test_shared_storage_is_mounted_at_the_same_path_on_head_and_workers(name):
    objects = objects_of(name)
    (pvc,) = [obj for obj in of_kind(objects, "PersistentVolumeClaim") if obj["metadata"]["name"] == SHARED_PVC]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for at, cluster in ray_clusters(objects):
        pods = ray_pods(cluster)
        assert len(pods) >= 2, f"{at}: a head and at least one worker group"
        for role, _, pod in pods:
            volumes = {v["name"] for v in pod.get("volumes", [])
                       if v.get("persistentVolumeClaim", {}).get("claimName") == SHARED_PVC}
            mounts = [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", []) if m["name"] in volumes]
            assert mounts == [SHARED_MOUNT], f"{at} {role}: {SHARED_PVC} mounted at {mounts}"


@pytest.mark.parametrize("name", BUILDS)
def test_head_is_cpu_only_and_schedules_no_training(name):
    for at, cluster in ray_clusters(objects_of(name)):
        head = cluster["headGroupSpec"]
        assert GPU not in json.dumps(head), f"{at}: the head must not ask for GPUs"
        assert head["rayStartParams"].get("num-cpus") == "0", f"{at}: head should advertise no CPUs to Ray"


def test_multi_gpu_overlay_requests_gpus():
    objects = objects_of("multi-gpu")
    ((_, cluster),) = ray_clusters(objects)
    total = 0
    for role, group, pod in ray_pods(cluster)[1:]:
        resources = pod["containers"][0]["resources"]
        assert int(resources["limits"][GPU]) == int(resources["requests"][GPU]) == 8, role
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod.get("tolerations", []), role
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
        total += int(resources["limits"][GPU]) * group["replicas"]
    assert total == 16
    (job,) = of_kind(objects, "RayJob")
    _, args, _ = parse_entrypoint(job["spec"]["entrypoint"])
    assert args.use_gpu and args.num_workers == total
    assert all(split_image(image)[1].endswith("-gpu") for _, image in manifest_images(objects)
               if "rec-dist/rec-dist" in image)


def test_cpu_smoke_overlay_has_no_gpu():
    objects = objects_of("cpu-smoke")
    assert GPU not in json.dumps(objects), "no GPU request, limit or toleration in the CPU smoke cluster"
    (job,) = of_kind(objects, "RayJob")
    _, args, cli_args = parse_entrypoint(job["spec"]["entrypoint"])
    assert not args.use_gpu and args.num_workers >= 2  # still distributed: 2 processes, gloo
    assert "--trainer.max_epochs" in cli_args
    images = [image for _, image in manifest_images(objects) if "rec-dist/rec-dist" in image]
    assert images and all(split_image(image)[1].endswith("-cpu") for image in images)


def test_no_secret_values_in_the_repository():
    problems = []
    for path in sorted(K8S.rglob("*.y*ml")):
        if CRD_DIR in path.parents:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                problems.append(f"{path.relative_to(ROOT)}: Secret {doc.get('metadata', {}).get('name')} carries data")
    for name in BUILDS:
        problems += [f"{name}: {where(obj)}" for obj in of_kind(objects_of(name), "Secret")]
    assert problems == []


@pytest.mark.parametrize("name", BUILDS)
def test_every_secret_reference_is_documented(name):
    objects = objects_of(name)
    assert {ref[0] for ref in secret_refs(objects)} == {
        "rec-dist-postgres", "rec-dist-mlflow-s3", "rec-dist-mlflow-auth", "rec-dist-mlflow-client"}
    assert secret_problems(objects, (K8S / "README.md").read_text()) == []


# ---- the checks fail when they should --------------------------------------------------------
def smoke_cluster() -> Object:
    (cluster,) = of_kind(objects_of("cpu-smoke"), "RayCluster")
    return cluster


def test_strict_schema_catches_a_misspelt_field():
    cluster = smoke_cluster()
    cluster["spec"]["workerGroupSpec"] = cluster["spec"].pop("workerGroupSpecs")
    errors = crd_errors(cluster)
    assert any("workerGroupSpec" in e and "Additional properties" in e for e in errors), errors
    assert crd_errors(cluster, strict=False) == [], "the CRD as published accepts the typo: hence strict"

    cluster = smoke_cluster()
    container = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # deep inside the pod template
    errors = crd_errors(cluster)
    assert any("containers.0" in e and "'resource'" in e for e in errors), errors

    job = of_kind(objects_of("cpu-smoke"), "RayJob")[0]
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    assert any("entryPoint" in e for e in crd_errors(job))


def test_strict_schema_catches_a_wrong_type():
    cluster = smoke_cluster()
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in crd_errors(cluster))
    cluster = smoke_cluster()
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert any("num-cpus" in e for e in crd_errors(cluster))


def test_kubernetes_validate_strict_catches_a_misspelt_field():
    (deployment,) = [obj for obj in objects_of("cpu-smoke") if where(obj) == "Deployment/mlflow"]
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    assert any("replica" in e for e in builtin_errors(deployment))
    (statefulset,) = of_kind(objects_of("cpu-smoke"), "StatefulSet")
    statefulset["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    assert builtin_errors(statefulset)


def test_resource_check_catches_a_missing_limit():
    cluster = smoke_cluster()
    del cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    problems = resource_problems([cluster])
    assert len(problems) == 1 and "ray-worker" in problems[0] and "limits.memory" in problems[0]
    job = of_kind(objects_of("cpu-smoke"), "RayJob")[0]
    del job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["requests"]
    assert len(resource_problems([job])) == 2  # requests.cpu and requests.memory


def test_security_check_catches_root_and_privilege_escalation():
    cluster = smoke_cluster()
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["securityContext"]["runAsUser"] = 0
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    del worker["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
    problems = security_problems([cluster])
    assert len(problems) == 2
    assert "runAsUser" in problems[0] and "allowPrivilegeEscalation" in problems[1]
    # the pod-level runAsNonRoot counts when the container does not set it; neither -> caught
    del worker["containers"][0]["securityContext"]["runAsNonRoot"]
    assert len(security_problems([cluster])) == 2
    del worker["securityContext"]["runAsNonRoot"]
    assert len(security_problems([cluster])) == 3


def test_image_check_catches_latest_and_untagged_images():
    assert len(image_problems([("a", "x:latest"), ("b", "postgres"), ("c", "localhost:5000/pg"), ("d", "")])) == 4
    assert image_problems([("a", "postgres:16.4"), ("b", "localhost:5000/pg:1.0"),
                           ("c", "pg@sha256:" + "0" * 64)]) == []


@pytest.mark.parametrize(("change", "expected"), [
    (lambda e: "rec-dist data prepare movielens-100k && " + e, "one command"),
    (lambda e: e.replace("jobs/train.py", "jobs/no_such_job.py"), "no_such_job.py does not exist"),
    (lambda e: e.replace("deepfm_torchrec.yaml", "no_such.yaml"), "is not a file in configs/"),
    (lambda e: e.replace("--num_workers 2", "--num_worker 2"), "'--num_worker' is neither"),  # typo
    (lambda e: e.replace("--num_workers 2", "--num_workers 9"), "the worker groups hold 4"),  # 2 pods x 2 CPUs
    (lambda e: e + " --use_gpu", "the worker groups hold 0"),  # no GPU in the smoke cluster
    (lambda e: e.replace("/mnt/shared/ray", "/tmp/ray"), "not on the shared volume"),
    (lambda e: e.replace("python jobs/train.py", "python3 -m jobs.train"), "does not exist"),
])
def test_entrypoint_check_catches_bad_jobs(change, expected):
    objects = objects_of("cpu-smoke")
    (job,) = of_kind(objects, "RayJob")
    assert entrypoint_problems(objects) == []
    job["spec"]["entrypoint"] = change(job["spec"]["entrypoint"])
    problems = entrypoint_problems(objects)
    assert any(expected in problem for problem in problems), problems


def test_secret_check_catches_undocumented_secrets():
    objects = objects_of("cpu-smoke")
    readme = (K8S / "README.md").read_text()
    assert documented_secrets(readme)["rec-dist-mlflow-auth"] == {"admin-username", "admin-password",
                                                                  "flask-secret-key"}
    (deployment,) = [obj for obj in objects if where(obj) == "Deployment/mlflow"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "rec-dist-postgres", "key": "host"}}})
    env.append({"name": "Y", "valueFrom": {"secretKeyRef": {"name": "undocumented", "key": "k"}}})
    problems = secret_problems(objects, readme)
    assert len(problems) == 2 and any("'host'" in p for p in problems) and any("undocumented" in p for p in problems)


def test_loader_rejects_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n")
    kustomization = tmp_path / "kustomization.yaml"

    kustomization.write_text("resources: [cm.yaml]\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        build(tmp_path)
    kustomization.write_text("resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: a}\n"
                             "  patch: |-\n    data: {k: w}\n")
    with pytest.raises(ValueError, match="strategic-merge"):
        build(tmp_path)
    kustomization.write_text("resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: b}\n"
                             "  patch: '[{op: remove, path: /data}]'\n")
    with pytest.raises(ValueError, match="selects no object"):
        build(tmp_path)
    kustomization.write_text("resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: a}\n"
                             "  patch: '[{op: test, path: /data/k, value: other}, {op: remove, path: /data}]'\n")
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        build(tmp_path)
    kustomization.write_text("resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: a}\n  patch: "
                             "'[{op: test, path: /data/k, value: v}, {op: replace, path: /data/k, value: w}]'\n")
    assert build(tmp_path) == [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"},
                                "data": {"k": "w"}}]


def test_loader_images_transformer():
    obj = {"kind": "RayJob", "spec": {"x": {"containers": [{"name": "a", "image": "reg:5000/img:1"},
                                                           {"name": "b", "image": "other:2"}]},
                                      "initContainers": [{"name": "c", "image": "reg:5000/img"}]}}
    set_image(obj, {"name": "reg:5000/img", "newTag": "9"})
    assert [c["image"] for c in obj["spec"]["x"]["containers"]] == ["reg:5000/img:9", "other:2"]
    assert obj["spec"]["initContainers"][0]["image"] == "reg:5000/img:9"
    set_image(obj, {"name": "other", "newName": "mirror/other"})
    assert obj["spec"]["x"]["containers"][1]["image"] == "mirror/other:2"
