"""Where `unidra demo` runs: the Cluster protocol, and the embedded cluster that needs no Kubernetes.

The story (driver.demo.story) asks a Cluster for the few things a real cluster does around a DRA
driver: a Node, registering the plugin, allocating a claim, preparing it for a pod, and the
device health kubelet sees. The embedded cluster does them with an in-process API server, a
kubelet stand-in that speaks the real gRPC protocols over the plugin's Unix sockets, and a
scheduler stand-in that picks the first healthy device. A cluster of real Kubernetes binaries
(driver.demo.kube) implements the same protocol.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from driver import kubeapi
from driver.demo.apiserver import ApiServer
from driver.errors import UnidraError
from driver.kubelet import client as kubelet

T = TypeVar("T")


@dataclass(frozen=True)
class NodeDirectories:
    """The node directories kubelet and the container runtime share with the plugin."""

    registrar_dir: Path
    plugins_dir: Path
    cdi_root: Path


class Cluster(Protocol):
    description: str
    kubeconfig: Path
    directories: NodeDirectories

    def add_node(self, name: str) -> None:
        """Make `name` a Node of the cluster."""

    def register(self, driver: str, timeout: float) -> str:
        """Wait until kubelet registered the plugin; returns the endpoint kubelet will call."""

    def allocate(self, namespace: str, name: str, driver: str, node: str) -> str:
        """Allocate the claim for a pod on `node` (the scheduler's job); returns the device."""

    def prepare(self, namespace: str, name: str) -> list[str]:
        """Have kubelet prepare the claim for its pod; returns the CDI device IDs."""

    def unprepare(self, namespace: str, name: str) -> None:
        """The pod is gone: have kubelet unprepare the claim."""

    def health(self, device: str, timeout: float, unhealthy: bool) -> str:
        """Wait until kubelet sees the device (un)healthy; returns what kubelet was told."""

    def close(self) -> None: ...


@dataclass
class EmbeddedCluster:
    """An in-process API server, a kubelet stand-in and a scheduler stand-in, under `root`."""

    root: Path
    description: str = "an API server in this process and stand-ins for kubelet and the scheduler"
    server: ApiServer = field(default_factory=ApiServer)
    plugin: kubelet.Plugin | None = None
    _stream: Any = None

    def __post_init__(self) -> None:
        self.directories = NodeDirectories(
            registrar_dir=self.root / "plugins_registry",
            plugins_dir=self.root / "plugins",
            cdi_root=self.root / "cdi",
        )
        for directory in (self.directories.registrar_dir, self.directories.plugins_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.server.start()
        self.kubeconfig = self.server.write_kubeconfig(self.root / "kubeconfig")
        self.rest = kubeapi.Rest(kubeapi.build_client(self.kubeconfig))

    def add_node(self, name: str) -> None:
        self.rest.json(f"creating node {name}", "POST", "/api/v1/nodes", body=_node(name))

    def register(self, driver: str, timeout: float) -> str:
        self.plugin = kubelet.wait_for_registration(
            self.directories.registrar_dir, timeout=timeout, expected_driver=driver
        )
        return self.plugin.info.endpoint

    def allocate(self, namespace: str, name: str, driver: str, node: str) -> str:
        claim = self._claim(namespace, name)
        listing = self.rest.json(
            "listing ResourceSlices",
            "GET",
            kubeapi.SLICES,
            {"fieldSelector": f"spec.driver={driver},spec.nodeName={node}"},
        )
        device = _first_healthy_gpu(listing.get("items") or [])
        request = claim["spec"]["devices"]["requests"][0]["name"]
        claim["status"] = {
            "allocation": {
                "devices": {
                    "results": [
                        {"request": request, "driver": driver, "pool": node, "device": device}
                    ]
                },
                "nodeSelector": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": [node]}
                            ]
                        }
                    ]
                },
            },
            "reservedFor": [{"resource": "pods", "name": f"{name}-pod", "uid": str(uuid.uuid4())}],
        }
        self.rest.json(
            f"allocating claim {namespace}/{name}",
            "PUT",
            f"{_claims(namespace)}/{name}/status",
            body=claim,
        )
        return device

    def prepare(self, namespace: str, name: str) -> list[str]:
        result = self._kubelet().prepare([self._ref(namespace, name)])
        (answer,) = result.values()
        if answer.error:
            raise UnidraError(f"NodePrepareResources failed: {answer.error}")
        return [i for d in answer.devices for i in d["cdiDeviceIDs"]]

    def unprepare(self, namespace: str, name: str) -> None:
        result = self._kubelet().unprepare([self._ref(namespace, name)])
        (answer,) = result.values()
        if answer.error:
            raise UnidraError(f"NodeUnprepareResources failed: {answer.error}")

    def health(self, device: str, timeout: float, unhealthy: bool) -> str:
        """Read kubelet's health stream (KEP-4680) until it reports the device as wanted."""
        if self._stream is None:
            self._stream = self._kubelet().watch_health()
        deadline = time.monotonic() + timeout
        for message in self._stream:
            for item in message.devices:
                if item.device.device_name != device:
                    continue
                state = kubelet.health_name(item.health)
                if (state == "UNHEALTHY") == unhealthy:
                    return f"{state} {item.message}".rstrip()
            if time.monotonic() > deadline:
                break
        raise UnidraError(f"kubelet's health stream did not report {device} within {timeout} s")

    def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        if self.plugin is not None:
            self.plugin.close()
        self.server.stop()

    def _kubelet(self) -> kubelet.Plugin:
        if self.plugin is None:
            raise UnidraError("the plugin is not registered with kubelet")
        return self.plugin

    def _claim(self, namespace: str, name: str) -> dict[str, Any]:
        return self.rest.json(
            f"reading claim {namespace}/{name}", "GET", f"{_claims(namespace)}/{name}"
        )

    def _ref(self, namespace: str, name: str) -> tuple[str, str, str]:
        return namespace, name, str(self._claim(namespace, name)["metadata"]["uid"])


def _claims(namespace: str) -> str:
    return f"{kubeapi.RESOURCE}/namespaces/{namespace}/resourceclaims"


def _node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }


def _first_healthy_gpu(slices: list[dict[str, Any]]) -> str:
    """The scheduler's stand-in: the first untainted whole GPU (what gpu.unidra.dev selects)."""
    for item in sorted(slices, key=lambda s: s["metadata"]["name"]):
        for device in item["spec"].get("devices") or []:
            attributes = device.get("attributes") or {}
            kind = attributes.get("type", {}).get("string")
            partition = attributes.get("partition", {}).get("bool")
            if kind == "gpu" and not partition and not device.get("taints"):
                return str(device["name"])
    raise UnidraError("no healthy GPU in the published ResourceSlices")


def wait(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `probe` until it returns something true; an UnidraError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise UnidraError(f"the demo waited {timeout:.0f} s for {what} in vain")
