"""Render a kustomization as `kubectl kustomize` does, for machines without kubectl.

Supports what manifests/ uses: `resources` (files and directories), `components`, and inline
JSON 6902 `patches` with a kind/name target. `render` prefers the real kubectl when it is on
PATH; tests compare the two so this stand-in cannot drift from kustomize.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization produces: by kubectl when available, else by `build`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return build(directory)
    return kubectl_build(directory)


def kubectl_build(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def build(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / KUSTOMIZATION).read_text())
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += build(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    for component in spec.get("components", []):
        objects = _apply_component(directory / component, objects)
    return _patch(objects, spec.get("patches", []))


def _apply_component(directory: Path, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / KUSTOMIZATION).read_text())
    assert spec["kind"] == "Component", directory
    for entry in spec.get("resources", []):
        objects = objects + [o for o in yaml.safe_load_all((directory / entry).read_text()) if o]
    return _patch(objects, spec.get("patches", []))


def _patch(objects: list[dict[str, Any]], patches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    result = copy.deepcopy(objects)
    for patch in patches:
        target = patch["target"]
        operations = yaml.safe_load(patch["patch"])
        matched = [
            o
            for o in result
            if o["kind"] == target.get("kind", o["kind"])
            and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
        ]
        assert matched, f"patch target {target} matches nothing"
        for item in matched:
            for operation in operations:
                _operate(item, operation)
    return result


def _operate(document: dict[str, Any], operation: dict[str, Any]) -> None:
    *parents, last = [_unescape(p) for p in operation["path"].lstrip("/").split("/")]
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op = operation["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, operation["value"])
        elif op == "replace":
            node[index] = operation["value"]
        elif op == "remove":
            del node[index]
        else:
            raise ValueError(f"unsupported JSON patch op {op}")
        return
    if op in ("add", "replace"):
        if op == "replace" and last not in node:
            raise KeyError(f"replace of missing {operation['path']}")
        node[last] = operation["value"]
    elif op == "remove":
        del node[last]
    else:
        raise ValueError(f"unsupported JSON patch op {op}")


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")
