"""gRPC servers on Unix sockets, started DRA-first and stopped registration-first.

Kubelet may call the DRA socket as soon as GetInfo answered, so the DRA server must be serving
before the registration socket appears. On stop the registration socket goes first, so kubelet
deregisters this instance (and moves to a surge instance) while in-flight calls finish.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from driver.errors import FatalError
from driver.kubelet import sockets

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.Server], None]


class UnixServer:
    """One grpc.Server listening on one Unix socket path."""

    def __init__(self, path: Path, register: Registrar, workers: int, name: str) -> None:
        self.path = path
        self.name = name
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name),
            options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
        )
        register(self._server)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if sockets.clear_stale(self.path):
            log.info("Removed stale socket", extra={"path": str(self.path)})
        try:
            self._server.add_insecure_port(f"unix://{self.path}")
        except RuntimeError as err:
            raise FatalError(f"cannot listen on {self.path}: {err}") from err
        self._server.start()
        # Only the driver (root) and kubelet (root) may connect.
        os.chmod(self.path, 0o600)
        log.info("Serving", extra={"server": self.name, "socket": str(self.path)})

    def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight calls finish within `grace`, and remove our socket."""
        self._server.stop(grace).wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class PluginServers:
    """The DRA service socket and the registration socket, in kubelet's order."""

    def __init__(self, dra: UnixServer, registration: UnixServer) -> None:
        self.dra = dra
        self.registration = registration

    def start(self) -> None:
        self.dra.start()
        try:
            self.registration.start()
        except BaseException:
            self.dra.stop(0)
            raise

    def stop(self, grace: float) -> None:
        self.registration.stop(0)
        self.dra.stop(grace)
