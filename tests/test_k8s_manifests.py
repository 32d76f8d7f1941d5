"""Offline validation of the Kubernetes manifests (k8s/): the loader, every build, and the schemas.

No cluster, kubectl or kustomize binary is needed: tests/k8s_kustomize.py builds the base
and every overlay, tests/k8s_schemas.py and tests/k8s_checks.py hold the checks. Here: each build has every
component, the KubeRay objects match the vendored CRDs made strict, the built-in kinds pass
``kubernetes-validate`` (strict), and the schemas and the loader reject what they should.
The Ray cluster, job and image checks are in test_k8s_manifests_cluster.py; MLflow, shared
storage and Secrets in test_k8s_manifests_mlflow.py.
"""

from __future__ import annotations

import re

import jsonpatch
import kubernetes_validate
import pytest

from tests.k8s_checks import SHARED_PVC, smoke_cluster
from tests.k8s_kustomize import (
    BUILDS,
    build,
    built,
    group_version,
    objects_of,
    of_kind,
    set_image,
    where,
)
from tests.k8s_schemas import CRD_DIR, CRD_FILES, KUBERNETES_VERSION, SHARED_CRD_DIR, builtin_errors, crd_errors


def test_vendored_crds_are_the_recorded_copies():
    """The vendored CRDs hash to what their origin note records, and equal the shared copy where one exists."""
    import hashlib
    import re

    assert set(CRD_FILES.values()) <= {p.name for p in CRD_DIR.iterdir()}
    note = (CRD_DIR / "README.md").read_text()
    recorded = dict((name, digest) for digest, name in re.findall(r"([0-9a-f]{64})\s+(\S+\.yaml)", note))
    for name in CRD_FILES.values():
        assert hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() == recorded.get(name), (
            f"{name}: not the copy recorded in k8s/schemas/kuberay/README.md"
        )
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
        ("PersistentVolumeClaim", SHARED_PVC),
        ("Service", "postgres"),
        ("StatefulSet", "postgres"),
        ("ConfigMap", "mlflow-config"),
        ("Service", "mlflow"),
        ("Deployment", "mlflow"),
        ("RayCluster", "rec-dist"),
        ("RayJob", "rec-dist-train"),
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
            kubernetes_validate.validate(
                {"apiVersion": obj["apiVersion"], "kind": obj["kind"]}, KUBERNETES_VERSION, strict=True
            )
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where(obj)}: no schema for {obj['apiVersion']} in Kubernetes {KUBERNETES_VERSION}")
        except kubernetes_validate.ValidationError:
            pass
    assert [e for obj in objects for e in builtin_errors(obj)] == []


# ---- the checks fail when they should --------------------------------------------------------
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


def test_loader_rejects_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n")
    kustomization = tmp_path / "kustomization.yaml"

    kustomization.write_text("resources: [cm.yaml]\nnamePrefix: x-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        build(tmp_path)
    kustomization.write_text(
        "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: a}\n  patch: |-\n    data: {k: w}\n"
    )
    with pytest.raises(ValueError, match="strategic-merge"):
        build(tmp_path)
    kustomization.write_text(
        "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: b}\n  patch: '[{op: remove, path: /data}]'\n"
    )
    with pytest.raises(ValueError, match="selects no object"):
        build(tmp_path)
    kustomization.write_text(
        "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: a}\n"
        "  patch: '[{op: test, path: /data/k, value: other}, {op: remove, path: /data}]'\n"
    )
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        build(tmp_path)
    kustomization.write_text(
        "resources: [cm.yaml]\npatches:\n- target: {kind: ConfigMap, name: a}\n  patch: "
        "'[{op: test, path: /data/k, value: v}, {op: replace, path: /data/k, value: w}]'\n"
    )
    assert build(tmp_path) == [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "w"}}]


def test_loader_images_transformer():
    obj = {
        "kind": "RayJob",
        "spec": {
            "x": {"containers": [{"name": "a", "image": "reg:5000/img:1"}, {"name": "b", "image": "other:2"}]},
            "initContainers": [{"name": "c", "image": "reg:5000/img"}],
        },
    }
    set_image(obj, {"name": "reg:5000/img", "newTag": "9"})
    assert [c["image"] for c in obj["spec"]["x"]["containers"]] == ["reg:5000/img:9", "other:2"]
    assert obj["spec"]["initContainers"][0]["image"] == "reg:5000/img:9"
    set_image(obj, {"name": "other", "newName": "mirror/other"})
    assert obj["spec"]["x"]["containers"][1]["image"] == "mirror/other:2"
