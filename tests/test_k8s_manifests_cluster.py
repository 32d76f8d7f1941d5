"""Offline checks of the Ray cluster, the RayJob and the training image (k8s/, Dockerfile).

What no schema says: resources and non-root security contexts, pinned images, the RayJob
entry point, the Ray version, GPUs per overlay; and each check fails when it should.
"""

from __future__ import annotations

import importlib.metadata
import json
import re

import pytest
from packaging.requirements import Requirement

from tests.k8s_checks import (
    APP_DIR,
    GPU,
    dockerfile_args,
    dockerfile_from_images,
    dockerfile_lines,
    entrypoint_problems,
    image_problems,
    manifest_images,
    parse_entrypoint,
    pinned,
    ray_clusters,
    ray_pods,
    resource_problems,
    security_problems,
    smoke_cluster,
)
from tests.k8s_kustomize import (
    BUILDS,
    K8S,
    ROOT,
    containers_of,
    objects_of,
    of_kind,
    split_image,
)


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
    allowed = {
        line.strip()[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip().startswith("!")
    }
    copied = [
        src
        for line in dockerfile_lines(dockerfile)
        if line.startswith("COPY ")
        for src in line.split()[1:-1]
        if not src.startswith("--")
    ]
    assert copied and set(copied) <= allowed, set(copied) - allowed
    assert {"jobs", "configs"} <= set(copied)


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
    assert all(
        split_image(image)[1].endswith("-gpu") for _, image in manifest_images(objects) if "rec-dist/rec-dist" in image
    )


def test_cpu_smoke_overlay_has_no_gpu():
    objects = objects_of("cpu-smoke")
    assert GPU not in json.dumps(objects), "no GPU request, limit or toleration in the CPU smoke cluster"
    (job,) = of_kind(objects, "RayJob")
    _, args, cli_args = parse_entrypoint(job["spec"]["entrypoint"])
    assert not args.use_gpu and args.num_workers >= 2  # still distributed: 2 processes, gloo
    assert "--trainer.max_epochs" in cli_args
    images = [image for _, image in manifest_images(objects) if "rec-dist/rec-dist" in image]
    assert images and all(split_image(image)[1].endswith("-cpu") for image in images)


# ---- the checks fail when they should --------------------------------------------------------
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
    assert (
        image_problems([("a", "postgres:16.4"), ("b", "localhost:5000/pg:1.0"), ("c", "pg@sha256:" + "0" * 64)]) == []
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda e: "rec-dist data prepare movielens-100k && " + e, "one command"),
        (lambda e: e.replace("jobs/train.py", "jobs/no_such_job.py"), "no_such_job.py does not exist"),
        (lambda e: e.replace("deepfm_torchrec.yaml", "no_such.yaml"), "is not a file in configs/"),
        (lambda e: e.replace("--num_workers 2", "--num_worker 2"), "'--num_worker' is neither"),  # typo
        (lambda e: e.replace("--num_workers 2", "--num_workers 9"), "the worker groups hold 4"),  # 2 pods x 2 CPUs
        (lambda e: e + " --use_gpu", "the worker groups hold 0"),  # no GPU in the smoke cluster
        (lambda e: e.replace("/mnt/shared/ray", "/tmp/ray"), "not on the shared volume"),
        (lambda e: e.replace("python jobs/train.py", "python3 -m jobs.train"), "does not exist"),
    ],
)
def test_entrypoint_check_catches_bad_jobs(change, expected):
    objects = objects_of("cpu-smoke")
    (job,) = of_kind(objects, "RayJob")
    assert entrypoint_problems(objects) == []
    job["spec"]["entrypoint"] = change(job["spec"]["entrypoint"])
    problems = entrypoint_problems(objects)
    assert any(expected in problem for problem in problems), problems
