"""`unidra demo --kube-bin DIR`: the demo's cluster from real Kubernetes binaries (driver.localcluster).

etcd, the API server, the controller manager, the scheduler and a kubelet on fakecri run in the
demo's private directory. The story's claim goes to a pod: the real scheduler allocates it, the
real kubelet calls NodePrepareResources and NodeUnprepareResources, and health is read where
kubelet reports it, in the pod's status.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from driver.demo.cluster import NodeDirectories, wait
from driver.errors import UnidraError
from driver.localcluster import LocalCluster

POD_SUFFIX = "-pod"
IMAGE = "demo.invalid/pause:1"  # fakecri runs no image; it records what kubelet asks for


class KubeCluster:
    """A LocalCluster with one kubelet (node `node`) under `root`, started at once."""

    def __init__(self, bin_dir: Path, root: Path, node: str) -> None:
        if os.geteuid() != 0:
            raise UnidraError(
                "--kube-bin needs root: kubelet mounts pod volumes (run it with sudo, or leave "
                "--kube-bin out for the embedded API server)"
            )
        self.local = LocalCluster(bin_dir, root / "cluster", node_name=node)
        self.description = (
            f"real Kubernetes from {bin_dir}: etcd, kube-apiserver, kube-controller-manager, "
            "kube-scheduler and a kubelet whose containers run on fakecri"
        )
        self.local.start()
        self.kubeconfig = self.local.admin_kubeconfig
        self.directories = NodeDirectories(
            registrar_dir=self.local.registrar_dir,
            plugins_dir=self.local.plugins_dir,
            cdi_root=root / "cdi",
        )
        self.uids: dict[tuple[str, str], str] = {}

    def add_node(self, name: str) -> None:
        """Kubelet registered the node when it started; only check that it is the one asked for."""
        if self._get(f"/api/v1/nodes/{name}") is None:
            raise UnidraError(f"kubelet did not register node {name}")

    def register(self, driver: str, timeout: float) -> str:
        kubelet = self.local.components["kubelet"]

        def registered() -> str | None:
            for line in kubelet.output().splitlines():
                if "Registered DRA plugin" in line and f'"{driver}"' in line:
                    found = re.search(r'endpoint="([^"]+)"', line)
                    return found.group(1) if found else line
            return None

        return wait(registered, timeout, f"kubelet to register {driver}")

    def allocate(self, namespace: str, name: str, driver: str, node: str) -> str:
        """Create the pod that uses the claim; the scheduler allocates it and kubelet prepares it."""
        wait(
            lambda: self._get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
            60,
            f"the default service account of {namespace}",
        )
        self._ensure_device_class(driver)
        self.local.request("POST", f"/api/v1/namespaces/{namespace}/pods", _pod(namespace, name))
        claim = wait(lambda: self._allocated(namespace, name), 60, "the scheduler to allocate")
        self.uids[(namespace, name)] = claim["metadata"]["uid"]
        results = claim["status"]["allocation"]["devices"]["results"]
        return ", ".join(str(r["device"]) for r in results)

    def prepare(self, namespace: str, name: str) -> list[str]:
        """Wait for kubelet to run the pod; the CDI device IDs fakecri received for its container."""
        pod = f"{name}{POD_SUFFIX}"
        wait(lambda: self._ready(namespace, pod), 60, f"pod {namespace}/{pod} to run")
        ids = self._cdi_devices(namespace, pod)
        if not ids:
            raise UnidraError(f"kubelet passed no CDI device to the runtime for {namespace}/{pod}")
        return ids

    def unprepare(self, namespace: str, name: str) -> None:
        """Delete the pod; wait until kubelet had the claim unprepared (its CDI spec is gone)."""
        pod = f"{name}{POD_SUFFIX}"
        self.local.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{pod}")
        uid = self.uids[(namespace, name)]
        wait(
            lambda: not list(self.directories.cdi_root.glob(f"*claim_{uid}.json")) or None,
            60,
            "kubelet to unprepare the claim",
        )

    def health(self, device: str, timeout: float, unhealthy: bool) -> str:
        """Wait until the pod's status (allocatedResourcesStatus) shows the device as wanted."""
        wanted = "Unhealthy" if unhealthy else "Healthy"

        def reported() -> str | None:
            for namespace, name in self.uids:
                pod = f"{name}{POD_SUFFIX}"
                found = self._get(f"/api/v1/namespaces/{namespace}/pods/{pod}") or {}
                for resource, item in _allocated_resources(found):
                    if item["resourceID"].endswith(f"-{device}") and item.get("health") == wanted:
                        said = f"{wanted} {item.get('message', '')}".rstrip()
                        return f"{said} (pod {pod}, {resource})"
            return None

        return wait(reported, timeout, f"the pod's status to show {device} {wanted}")

    def close(self) -> None:
        self.local.stop()

    def _get(self, path: str) -> Any:
        return self.local.get_json(path)

    def _ensure_device_class(self, driver: str) -> None:
        """The DeviceClass the story's claim names, as manifests/base/deviceclasses.yaml has it."""
        name = f"gpu.{driver}"
        if self._get(f"/apis/resource.k8s.io/v1/deviceclasses/{name}") is not None:
            return
        expression = (
            f'device.driver == "{driver}" && !device.attributes[device.driver].partition && '
            'device.attributes[device.driver].type == "gpu"'
        )
        self.local.request(
            "POST",
            "/apis/resource.k8s.io/v1/deviceclasses",
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "DeviceClass",
                "metadata": {"name": name},
                "spec": {"selectors": [{"cel": {"expression": expression}}]},
            },
        )

    def _allocated(self, namespace: str, name: str) -> dict[str, Any] | None:
        claim = self._get(f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}")
        found: dict[str, Any] | None = (
            claim if (claim or {}).get("status", {}).get("allocation") else None
        )
        return found

    def _ready(self, namespace: str, pod: str) -> bool:
        found = self._get(f"/api/v1/namespaces/{namespace}/pods/{pod}") or {}
        conditions = found.get("status", {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _cdi_devices(self, namespace: str, pod: str) -> list[str]:
        """From fakecri's record of CreateContainer calls."""
        names: list[str] = []
        log = self.local.container_log
        for line in log.read_text().splitlines() if log.exists() else []:
            entry = json.loads(line)
            if entry.get("pod") == pod and entry.get("namespace") == namespace:
                names = list(entry.get("cdi") or [])
        return names


def _allocated_resources(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(resource name, device entry) of every container's allocatedResourcesStatus."""
    for container in pod.get("status", {}).get("containerStatuses") or []:
        for resource in container.get("allocatedResourcesStatus") or []:
            for item in resource.get("resources") or []:
                yield str(resource["name"]), item


def _pod(namespace: str, claim: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{claim}{POD_SUFFIX}", "namespace": namespace},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {"name": "main", "image": IMAGE, "resources": {"claims": [{"name": "gpu"}]}}
            ],
            "resourceClaims": [{"name": "gpu", "resourceClaimName": claim}],
        },
    }
