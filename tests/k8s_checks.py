"""The checks the offline manifest tests (tests/test_k8s_manifests*.py) make that no schema can express.

Resources and non-root security contexts, pinned images, the RayJob entry point, the
Ray version, GPUs per overlay, shared storage, Secrets (the schemas are checked by
tests/k8s_schemas.py). Each ``*_problems`` function returns a list of problems (empty:
fine), so the tests can show that each check fails when it should. Not a test module
(no ``test_`` prefix).
"""

from __future__ import annotations
import __future__

import argparse
import ast
import functools
import math
import re
import shlex
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement

from tests.k8s_kustomize import (
    CONTAINER_LISTS,
    ROOT,
    Object,
    containers_of,
    objects_of,
    of_kind,
    pod_specs,
    split_image,
    where,
)

RUNNER = ROOT / "rec_dist" / "tune" / "ray_train.py"  # what jobs/train.py and jobs/evaluate.py run
SHARED_MOUNT = "/mnt/shared"
SHARED_PVC = "rec-dist-shared"
APP_DIR = "/app"  # WORKDIR of the training image = the RayJob's working_dir
GPU = "nvidia.com/gpu"
LIGHTNING_KEYS = ("--trainer.", "--model.", "--data.", "--seed_everything")


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
    return [
        (f"{where(obj)}{path}", container.get("image", "")) for obj in objects for path, container in containers_of(obj)
    ]


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
    return [
        (f"{path.relative_to(ROOT)}: {line}", line.split()[1])
        for line in dockerfile_lines(path)
        if line.startswith("FROM ")
    ]


def ray_clusters(objects: list[Object]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, RayCluster spec)``: RayClusters and clusters a RayJob creates itself."""
    specs = [(where(obj), obj["spec"]) for obj in of_kind(objects, "RayCluster")]
    specs += [
        (where(obj), obj["spec"]["rayClusterSpec"])
        for obj in of_kind(objects, "RayJob")
        if "rayClusterSpec" in obj["spec"]
    ]
    return specs


def ray_pods(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(role, group spec, pod spec)`` of the head and each worker group."""
    pods = [("head", cluster["headGroupSpec"], cluster["headGroupSpec"]["template"]["spec"])]
    pods += [
        (f"worker group {group['groupName']}", group, group["template"]["spec"])
        for group in cluster.get("workerGroupSpecs", [])
    ]
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
    code = compile(
        ast.Module(body=[function], type_ignores=[]),
        str(RUNNER),
        "exec",
        flags=__future__.annotations.compiler_flag,
        dont_inherit=True,
    )
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
        raise ValueError(
            f"{argv[1]} does not run rec_dist.tune.ray_train's main/evaluate_main: teach this test its options"
        )
    args, cli_args = runner_parse_args()(argv[2:], "k8s manifest check", stage=stage)
    return argv[1], args, cli_args


def entrypoint_problems(objects: list[Object]) -> list[str]:
    problems = []
    clusters = {obj["metadata"]["name"]: obj["spec"] for obj in of_kind(objects, "RayCluster")}
    for job in of_kind(objects, "RayJob"):
        at, spec = where(job), job["spec"]
        entrypoint = spec.get("entrypoint", "")
        if re.search(r"[;&|`<>]|\$\(", entrypoint):
            problems.append(
                f"{at}: the entry point must be one command (KubeRay runs what follows `&&`, "
                f"`;` or `|` in the submitter pod): {entrypoint!r}"
            )
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
            problems.append(
                f"{at}: --num_workers {args.num_workers} (x {args.cpus_per_worker} CPU"
                f"{', 1 GPU' if args.use_gpu else ''}) but the worker groups hold {slots}"
            )
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


def read_pyproject() -> dict[str, Any]:
    """The repository's pyproject.toml: the pins the image and the manifests must agree with."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(pyproject: dict[str, Any], package: str) -> Requirement:
    (requirement,) = [
        Requirement(dep) for dep in pyproject["project"]["dependencies"] if Requirement(dep).name == package
    ]
    return requirement


def smoke_cluster() -> Object:
    """A private copy of the cpu-smoke RayCluster, for the tests that break it on purpose."""
    (cluster,) = of_kind(objects_of("cpu-smoke"), "RayCluster")
    return cluster
