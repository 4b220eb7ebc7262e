"""The DRA health stream (KEP-4680): NodeWatchResources for v1alpha1 and v1, on the DRA socket.

Every message carries the complete device list of this driver, with `last_updated_time` and a
timeout; it is resent well inside the timeout, and at once when any device's health changes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import grpc

from driver.kubelet.gen.dra_health.v1 import api_pb2 as v1_pb2
from driver.kubelet.gen.dra_health.v1 import api_pb2_grpc as v1_grpc
from driver.kubelet.gen.dra_health.v1alpha1 import api_pb2 as v1alpha1_pb2
from driver.kubelet.gen.dra_health.v1alpha1 import api_pb2_grpc as v1alpha1_grpc
from driver.model import HealthStatus

HEALTH_SERVICES = ("v1alpha1.DRAResourceHealth", "v1.DRAResourceHealth")
MESSAGE_LIMIT = 1024

DeviceHealth = tuple[str, HealthStatus, str, float]  # device name, status, message, last change


class HealthStream:
    """Fans the current health out to every open kubelet stream."""

    def __init__(
        self,
        pool: str,
        snapshot: Callable[[], Sequence[DeviceHealth]],
        resend_seconds: float = 10.0,
        timeout_seconds: int = 60,
    ) -> None:
        self.pool = pool
        self.snapshot = snapshot
        self.resend_seconds = resend_seconds
        self.timeout_seconds = timeout_seconds
        self._changed = threading.Condition()
        self._version = 0
        self.streams = 0

    def notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def add_to(self, server: grpc.Server) -> None:
        v1alpha1_grpc.add_DRAResourceHealthServicer_to_server(_Servicer(self, v1alpha1_pb2), server)
        v1_grpc.add_DRAResourceHealthServicer_to_server(_Servicer(self, v1_pb2), server)

    def watch(self, pb2: ModuleType, context: grpc.ServicerContext) -> Iterator[Any]:
        ended = threading.Event()

        def end() -> None:
            ended.set()
            self.notify()

        context.add_callback(end)
        self.streams += 1
        try:
            while not ended.is_set():
                with self._changed:
                    seen = self._version
                yield self._message(pb2)
                self._wait(seen, ended)
        finally:
            self.streams -= 1

    def _wait(self, seen: int, ended: threading.Event) -> None:
        """Until something changes, the stream ends, or it is time to resend."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._version != seen or ended.is_set(), timeout=self.resend_seconds
            )

    def _message(self, pb2: ModuleType) -> Any:
        now = int(time.time())
        response = pb2.NodeWatchResourcesResponse()
        for name, status, message, _ in self.snapshot():
            text = (
                message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 3] + "..."
            )
            response.devices.add(
                device=pb2.DeviceIdentifier(pool_name=self.pool, device_name=name),
                health=_HEALTH[status](pb2),
                last_updated_time=now,
                health_check_timeout_seconds=self.timeout_seconds,
                message=text,
            )
        return response


_HEALTH = {
    HealthStatus.HEALTHY: lambda pb2: pb2.HEALTHY,
    HealthStatus.UNHEALTHY: lambda pb2: pb2.UNHEALTHY,
    HealthStatus.UNKNOWN: lambda pb2: pb2.UNKNOWN,
}


class _Servicer:
    def __init__(self, stream: HealthStream, pb2: ModuleType) -> None:
        self.stream = stream
        self.pb2 = pb2

    def NodeWatchResources(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self.stream.watch(self.pb2, context)
