"""Offline checks of the MLflow server, the shared storage and the Secrets in the Kubernetes manifests (k8s/).

The MLflow server image matches the pin and runs with PostgreSQL, S3 and basic auth; the
head and the workers mount the same shared volume; no Secret value is in the repository
and every Secret reference is documented; and the Secret check fails when it should.
"""

from __future__ import annotations

import configparser
import re
import subprocess

import pytest
import yaml

from tests.k8s_checks import (
    SHARED_MOUNT,
    SHARED_PVC,
    dockerfile_from_images,
    documented_secrets,
    env_of,
    pinned,
    ray_clusters,
    ray_pods,
    secret_problems,
    secret_refs,
)
from tests.k8s_kustomize import (
    BUILDS,
    K8S,
    ROOT,
    built,
    objects_of,
    of_kind,
    split_image,
    where,
)
from tests.k8s_schemas import CRD_DIR


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
    for variable in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "PG_USER",
        "PG_PASSWORD",
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
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
    env = {
        **config,
        "PATH": f"{stub.parent}:/usr/bin:/bin",
        "STUB_ARGS": str(tmp_path / "args"),
        "PG_USER": "mlflow",
        "PG_PASSWORD": "0123abcd",
    }
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
            volumes = {
                v["name"]
                for v in pod.get("volumes", [])
                if v.get("persistentVolumeClaim", {}).get("claimName") == SHARED_PVC
            }
            mounts = [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", []) if m["name"] in volumes]
            assert mounts == [SHARED_MOUNT], f"{at} {role}: {SHARED_PVC} mounted at {mounts}"


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
        "rec-dist-postgres",
        "rec-dist-mlflow-s3",
        "rec-dist-mlflow-auth",
        "rec-dist-mlflow-client",
    }
    assert secret_problems(objects, (K8S / "README.md").read_text()) == []


# ---- the checks fail when they should --------------------------------------------------------
def test_secret_check_catches_undocumented_secrets():
    objects = objects_of("cpu-smoke")
    readme = (K8S / "README.md").read_text()
    assert documented_secrets(readme)["rec-dist-mlflow-auth"] == {
        "admin-username",
        "admin-password",
        "flask-secret-key",
    }
    (deployment,) = [obj for obj in objects if where(obj) == "Deployment/mlflow"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "rec-dist-postgres", "key": "host"}}})
    env.append({"name": "Y", "valueFrom": {"secretKeyRef": {"name": "undocumented", "key": "k"}}})
    problems = secret_problems(objects, readme)
    assert len(problems) == 2 and any("'host'" in p for p in problems) and any("undocumented" in p for p in problems)
