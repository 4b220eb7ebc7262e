"""The kubelet's side of the plugin protocols, for `unidra demo`, tests and benchmarks: plugin
registration and DRA calls over real Unix sockets.

It follows kubelet's plugin watcher: find `*-reg.sock` files in the registrar directory, call
GetInfo with kubelet's 1 s deadline, check the answer the way kubelet's DRA handler does, pick
the first advertised DRA service kubelet knows, and confirm with NotifyRegistrationStatus.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from driver.kubelet.gen.dra.v1 import api_pb2 as v1_pb2
from driver.kubelet.gen.dra.v1 import api_pb2_grpc as v1_grpc
from driver.kubelet.gen.dra.v1beta1 import api_pb2 as v1beta1_pb2
from driver.kubelet.gen.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from driver.kubelet.gen.dra_health.v1 import api_pb2 as health_v1_pb2
from driver.kubelet.gen.dra_health.v1 import api_pb2_grpc as health_v1_grpc
from driver.kubelet.gen.dra_health.v1alpha1 import api_pb2 as health_v1alpha1_pb2
from driver.kubelet.gen.dra_health.v1alpha1 import api_pb2_grpc as health_v1alpha1_grpc
from driver.kubelet.gen.pluginregistration.v1 import api_pb2 as reg_pb2
from driver.kubelet.gen.pluginregistration.v1 import api_pb2_grpc as reg_grpc

# kubelet 1.34+ (servicesSupportedByKubelet)
KUBELET_SERVICES: dict[str, tuple[ModuleType, ModuleType]] = {
    "v1.DRAPlugin": (v1_pb2, v1_grpc),
    "v1beta1.DRAPlugin": (v1beta1_pb2, v1beta1_grpc),
}
HEALTH_SERVICES: dict[str, tuple[ModuleType, ModuleType]] = {
    "v1alpha1.DRAResourceHealth": (health_v1alpha1_pb2, health_v1alpha1_grpc),
    "v1.DRAResourceHealth": (health_v1_pb2, health_v1_grpc),
}
GET_INFO_TIMEOUT = 1.0
CALL_TIMEOUT = 45.0


def health_name(status: int) -> str:
    """HEALTHY, UNHEALTHY or UNKNOWN, as the health stream names a status."""
    return str(health_v1alpha1_pb2.HealthStatus.Name(status))


class RegistrationRejected(Exception):
    pass


@dataclass
class ClaimResult:
    devices: list[dict[str, Any]]
    error: str


class Plugin:
    """A registered DRA plugin as kubelet holds it: one channel to its endpoint and the chosen service."""

    def __init__(self, info: reg_pb2.PluginInfo, service: str, registration_socket: Path) -> None:
        self.info = info
        self.service = service
        self.registration_socket = registration_socket
        self.channel = grpc.insecure_channel(f"unix://{info.endpoint}")

    def close(self) -> None:
        self.channel.close()

    def _stub(self, service: str | None) -> tuple[ModuleType, Any]:
        pb2, pb2_grpc = KUBELET_SERVICES[service or self.service]
        return pb2, pb2_grpc.DRAPluginStub(self.channel)

    def prepare(
        self,
        claims: Iterable[tuple[str, str, str]],
        service: str | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> dict[str, ClaimResult]:
        """Call NodePrepareResources with (namespace, name, uid) triples, checking the answer like kubelet."""
        pb2, stub = self._stub(service)
        request = pb2.NodePrepareResourcesRequest(
            claims=[pb2.Claim(namespace=ns, name=name, uid=uid) for ns, name, uid in claims]
        )
        response = stub.NodePrepareResources(request, timeout=timeout)
        return self._check(request, response, devices=True)

    def unprepare(
        self, claims: Iterable[tuple[str, str, str]], service: str | None = None
    ) -> dict[str, ClaimResult]:
        pb2, stub = self._stub(service)
        request = pb2.NodeUnprepareResourcesRequest(
            claims=[pb2.Claim(namespace=ns, name=name, uid=uid) for ns, name, uid in claims]
        )
        response = stub.NodeUnprepareResources(request, timeout=CALL_TIMEOUT)
        return self._check(request, response, devices=False)

    def watch_health(self, service: str = "v1alpha1.DRAResourceHealth") -> Any:
        """Open kubelet's health stream; iterate it for messages, `.cancel()` it to end."""
        pb2, pb2_grpc = HEALTH_SERVICES[service]
        return pb2_grpc.DRAResourceHealthStub(self.channel).NodeWatchResources(
            pb2.NodeWatchResourcesRequest()
        )

    @staticmethod
    def _check(request: Any, response: Any, devices: bool) -> dict[str, ClaimResult]:
        wanted = {claim.uid for claim in request.claims}
        unknown = set(response.claims) - wanted
        if unknown:
            raise AssertionError(f"returned result for unknown claim UID {sorted(unknown)}")
        if len(response.claims) < len(wanted):
            raise AssertionError(f"skipped {len(wanted) - len(response.claims)} ResourceClaims")
        results = {}
        for uid, entry in response.claims.items():
            listed = []
            if devices:
                for device in entry.devices:
                    item = {
                        "requestNames": list(device.request_names),
                        "poolName": device.pool_name,
                        "deviceName": device.device_name,
                        "cdiDeviceIDs": list(device.cdi_device_ids),
                    }
                    if "share_id" in device.DESCRIPTOR.fields_by_name and device.HasField(
                        "share_id"
                    ):
                        item["shareID"] = device.share_id
                    listed.append(item)
            results[uid] = ClaimResult(devices=listed, error=entry.error)
        return results


def find_registration_sockets(registrar_dir: Path) -> list[Path]:
    """Socket files kubelet's watcher would consider (dot files and non-sockets are ignored)."""
    found = []
    for entry in sorted(registrar_dir.iterdir()) if registrar_dir.is_dir() else []:
        if entry.name.startswith("."):
            continue
        try:
            if stat.S_ISSOCK(os.lstat(entry).st_mode):
                found.append(entry)
        except FileNotFoundError:
            continue
    return found


def register(socket_path: Path, expected_driver: str | None = None, notify: bool = True) -> Plugin:
    """Register one plugin the way kubelet does; raises RegistrationRejected with kubelet's reason."""
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        stub = reg_grpc.RegistrationStub(channel)
        info = stub.GetInfo(reg_pb2.InfoRequest(), timeout=GET_INFO_TIMEOUT)
        problem = _validate(info, expected_driver)
        if problem:
            if notify:
                stub.NotifyRegistrationStatus(
                    reg_pb2.RegistrationStatus(plugin_registered=False, error=problem), timeout=5
                )
            raise RegistrationRejected(problem)
        service = next(v for v in info.supported_versions if v in KUBELET_SERVICES)
        if notify:
            stub.NotifyRegistrationStatus(
                reg_pb2.RegistrationStatus(plugin_registered=True), timeout=5
            )
    return Plugin(info, service, socket_path)


def wait_for_registration(
    registrar_dir: Path, timeout: float = 20.0, expected_driver: str | None = None
) -> Plugin:
    """Wait until a registration socket appears and register it (kubelet is notified by inotify)."""
    deadline = time.monotonic() + timeout
    while True:
        sockets = find_registration_sockets(registrar_dir)
        if sockets:
            try:
                return register(sockets[-1], expected_driver)
            except grpc.RpcError as err:
                # A socket left by a killed process refuses connections until the new instance
                # replaces it; kubelet's reconciler retries registration the same way.
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no registration socket appeared in {registrar_dir} within {timeout}s"
            )
        time.sleep(0.01)


def _validate(info: reg_pb2.PluginInfo, expected_driver: str | None) -> str:
    if info.type != "DRAPlugin":
        return f"unknown plugin type {info.type!r}"
    if expected_driver is not None and info.name != expected_driver:
        return f"plugin name {info.name!r} is not the expected driver {expected_driver!r}"
    if not info.endpoint or not os.path.isabs(info.endpoint):
        return f"endpoint {info.endpoint!r} is not an absolute path"
    if not info.supported_versions:
        return "empty list of supported versions"
    if not any(v in KUBELET_SERVICES for v in info.supported_versions):
        return f"none of the versions {list(info.supported_versions)} is supported by kubelet"
    return ""
