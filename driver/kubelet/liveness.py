"""The standard gRPC health service on a TCP port, for the DaemonSet's liveness probe.

Every `Check` dials the plugin's own Unix sockets the way kubelet does: `GetInfo` on the
registration socket and an empty `NodePrepareResources` on the DRA socket. Either one failing
makes the answer NOT_SERVING, so kubelet restarts a container whose sockets stopped answering
(deleted from the host, or a wedged server), which the process itself cannot notice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from driver.errors import FatalError
from driver.kubelet.gen.dra.v1 import api_pb2 as dra_pb2
from driver.kubelet.gen.dra.v1 import api_pb2_grpc as dra_grpc
from driver.kubelet.gen.pluginregistration.v1 import api_pb2 as reg_pb2
from driver.kubelet.gen.pluginregistration.v1 import api_pb2_grpc as reg_grpc

log = logging.getLogger(__name__)

# Services a probe may name: "" is the whole plugin; the others say which socket failed.
REGISTRATION = "registration"
DRA = "dra"
CALL_TIMEOUT_SECONDS = 2.0


class SelfCheckingHealth(health.HealthServicer):
    """grpcio-health-checking's servicer, refreshed by a real round trip on each Check."""

    def __init__(self, registration_socket: Path, dra_socket: Path) -> None:
        super().__init__()
        self.registration_socket = registration_socket
        self.dra_socket = dra_socket

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.refresh()
        return super().Check(request, context)

    def refresh(self) -> bool:
        """Dial both sockets; record each result and the overall one. True when both answer."""
        results = {
            REGISTRATION: _answers(self.registration_socket, _get_info),
            DRA: _answers(self.dra_socket, _empty_prepare),
        }
        for service, ok in results.items():
            self.set(service, _status(ok))
        self.set("", _status(all(results.values())))
        return all(results.values())


class LivenessServer:
    """The health service on `0.0.0.0:<port>` (port 0: any free port, for tests)."""

    def __init__(self, port: int, servicer: SelfCheckingHealth) -> None:
        self.servicer = servicer
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="liveness"),
            # Without this, gRPC shares a port another process already listens on.
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self._server)
        # The probe comes from kubelet to the pod IP.
        everywhere = "0.0.0.0"  # noqa: S104
        try:
            self.port = self._server.add_insecure_port(f"{everywhere}:{port}")
        except RuntimeError as err:
            raise FatalError(f"cannot listen for health checks on port {port}: {err}") from err

    def start(self) -> None:
        self._server.start()
        log.info("Serving gRPC health checks", extra={"port": self.port})

    def stop(self) -> None:
        self._server.stop(0).wait()


def _status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )


def _get_info(channel: grpc.Channel) -> None:
    reg_grpc.RegistrationStub(channel).GetInfo(reg_pb2.InfoRequest(), timeout=CALL_TIMEOUT_SECONDS)


def _empty_prepare(channel: grpc.Channel) -> None:
    dra_grpc.DRAPluginStub(channel).NodePrepareResources(
        dra_pb2.NodePrepareResourcesRequest(), timeout=CALL_TIMEOUT_SECONDS
    )


def _answers(path: Path, call: Callable[[grpc.Channel], None]) -> bool:
    try:
        with grpc.insecure_channel(f"unix://{path}") as channel:
            call(channel)
        return True
    except grpc.RpcError as err:
        log.warning(
            "A plugin socket does not answer", extra={"socket": str(path), "error": str(err.code())}
        )
        return False
