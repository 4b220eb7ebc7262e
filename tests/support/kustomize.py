"""Render a kustomization as `kubectl kustomize` does, for machines without kubectl.

Supports what manifests/ uses: `resources` (files and directories), `components`, inline
JSON 6902 `patches` with a kind/name target, `replacements` (with delimiter and index options),
`namespace`, `configMapGenerator` with `files` and unhashed names, and dropping
`config.kubernetes.io/local-config` objects. `render` prefers a real
kubectl (the lab's Kubernetes 1.36 one, else one on PATH); tests compare the two so this
stand-in cannot drift from kustomize.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
LAB_KUBECTL = Path("/work/lab/kubectl")
LOCAL_CONFIG = "config.kubernetes.io/local-config"
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "DeviceClass", "NodeFeatureRule",
    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
}  # fmt: skip


def kubectl() -> str | None:
    return str(LAB_KUBECTL) if LAB_KUBECTL.is_file() else shutil.which("kubectl")


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects a kustomization produces: by kubectl when available, else by `build`."""
    if kubectl() is None:
        return build(directory)
    return kubectl_build(directory)


def kubectl_build(directory: Path) -> list[dict[str, Any]]:
    binary = kubectl()
    assert binary is not None
    done = subprocess.run(
        [binary, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def build(directory: Path) -> list[dict[str, Any]]:
    return [o for o in _build(directory) if _annotations(o).get(LOCAL_CONFIG) != "true"]


def _build(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / KUSTOMIZATION).read_text())
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += _build(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    for component in spec.get("components", []):
        objects = _apply_component(directory / component, objects)
    return _transform(spec, objects)


def _apply_component(directory: Path, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / KUSTOMIZATION).read_text())
    assert spec["kind"] == "Component", directory
    for entry in spec.get("resources", []):
        objects = objects + [o for o in yaml.safe_load_all((directory / entry).read_text()) if o]
    return _transform(spec, objects + _generated(directory, spec))


def _generated(directory: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """ConfigMaps of `configMapGenerator`, from files (names without a hash suffix only)."""
    generated = []
    for generator in spec.get("configMapGenerator", []):
        options = generator.get("options") or {}
        assert options.get("disableNameSuffixHash"), "only unhashed generated names"
        metadata: dict[str, Any] = {"name": generator["name"]}
        if generator.get("namespace"):
            metadata["namespace"] = generator["namespace"]
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        data = {Path(f).name: (directory / f).read_text() for f in generator.get("files", [])}
        generated.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        )
    return generated


def _transform(spec: dict[str, Any], objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A kustomization's own transformers, in kustomize's order."""
    if spec.get("namespace"):
        objects = _namespace(objects, spec["namespace"])
    objects = _patch(objects, spec.get("patches", []))
    return _replace(objects, spec.get("replacements", []))


def _annotations(item: dict[str, Any]) -> dict[str, str]:
    return item.get("metadata", {}).get("annotations") or {}


def _namespace(objects: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    result = copy.deepcopy(objects)
    for item in result:
        if item["kind"] == "Namespace":
            item["metadata"]["name"] = namespace
        elif item["kind"] not in CLUSTER_SCOPED:
            item["metadata"]["namespace"] = namespace
        for subject in item.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace
    return result


def _replace(
    objects: list[dict[str, Any]], replacements: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    result = copy.deepcopy(objects)
    for replacement in replacements:
        source = replacement["source"]
        (origin,) = [o for o in result if _selected(o, source)]
        value = _get(origin, source["fieldPath"])
        for target in replacement["targets"]:
            options = target.get("options") or {}
            for item in (o for o in result if _selected(o, target["select"])):
                for path in target["fieldPaths"]:
                    old = _get(item, path)
                    if "delimiter" in options:
                        parts = str(old).split(options["delimiter"])
                        parts[options.get("index", 0)] = str(value)
                        _set(item, path, options["delimiter"].join(parts))
                    else:
                        _set(item, path, value)
    return result


def _selected(item: dict[str, Any], select: dict[str, str]) -> bool:
    return item["kind"] == select.get("kind", item["kind"]) and item["metadata"][
        "name"
    ] == select.get("name", item["metadata"]["name"])


def _steps(node: Any, path: str) -> tuple[Any, Any]:
    """The parent container and key of a kustomize field path (a.b.[name=x].c, a.0.b)."""
    *parents, last = path.split(".")
    for part in parents:
        node = _step(node, part)
    return node, last


def _step(node: Any, part: str) -> Any:
    if part.startswith("["):
        key, _, wanted = part.strip("[]").partition("=")
        return next(i for i in node if str(i.get(key)) == wanted)
    return node[int(part)] if isinstance(node, list) else node[part]


def _get(item: dict[str, Any], path: str) -> Any:
    parent, last = _steps(item, path)
    return _step(parent, last)


def _set(item: dict[str, Any], path: str, value: Any) -> None:
    parent, last = _steps(item, path)
    if isinstance(parent, list):
        parent[int(last)] = value
    else:
        parent[last] = value


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
