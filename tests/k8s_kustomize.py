"""A minimal kustomize for the offline manifest tests (tests/test_k8s_manifests*.py), and build helpers.

No cluster, kubectl or kustomize binary is needed. ``build()`` is a small
kustomize loader for the subset the manifests use (see k8s/README.md): ``resources``,
``images`` and ``patches`` with a ``target`` and a JSON6902 operation list. Every other
kustomization field is rejected, so an overlay that uses one fails the tests instead of
being half-built. ``built(name)`` / ``objects_of(name)`` give the base and each overlay.
Not a test module (no ``test_`` prefix): pytest collects nothing here.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BUILDS = {
    "base": K8S / "base",
    "cpu-smoke": K8S / "overlays" / "cpu-smoke",
    "multi-gpu": K8S / "overlays" / "multi-gpu",
}
CONTAINER_LISTS = ("containers", "initContainers")

Object = dict[str, Any]


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
        raise ValueError(
            f"{kfile}: fields {sorted(unsupported)} are outside the supported subset "
            f"{sorted(KUSTOMIZATION_FIELDS)} (see k8s/README.md)"
        )
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
    actual = {"group": group, "version": version, "kind": obj.get("kind"), "name": obj.get("metadata", {}).get("name")}
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
        raise ValueError(
            f"{directory}: patch {patch.get('path', '(inline)')} is not a JSON6902 operation list "
            "(strategic-merge patches are not supported)"
        )
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
