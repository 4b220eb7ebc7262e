"""gRPC servers on Unix sockets, started DRA-first and stopped registration-first.

Kubelet may call the DRA socket as soon as GetInfo answered, so the DRA server must be serving
before the registration socket appears. On stop the registration socket goes first, so kubelet
deregisters this instance (and moves to a surge instance) while in-flight calls finish.
A socket file already at the path is replaced only if nobody serves it, and stopping removes
only the file this server bound. gRPC itself unlinks whatever is at its path when it binds and
when it stops, so it binds a hidden name that is then renamed into place: what gRPC removes on
stop is a name that no longer exists.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

from driver.errors import FatalError
from driver.socket_files import SocketFile, clear_stale

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
        self._bound: SocketFile | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if clear_stale(self.path):
            log.info("Removed stale socket", extra={"path": str(self.path)})
        # Hidden (kubelet's watcher skips dot files) and never longer than the real name.
        hidden = self.path.with_name("." + base64.b32encode(os.urandom(5)).decode().lower()[:7])
        try:
            self._server.add_insecure_port(f"unix://{hidden}")
        except RuntimeError as err:
            raise FatalError(f"cannot listen on {self.path}: {err}") from err
        # Only the driver (root) and kubelet (root) may connect.
        os.chmod(hidden, 0o600)
        os.rename(hidden, self.path)
        self._bound = SocketFile.bound_at(self.path)
        self._server.start()
        log.info("Serving", extra={"server": self.name, "socket": str(self.path)})

    def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight calls finish within `grace`, and remove our socket."""
        self._server.stop(grace).wait()
        if self._bound is not None and not self._bound.remove() and os.path.lexists(self.path):
            log.warning(
                "Our socket was replaced by another process's; left in place",
                extra={"path": str(self.path)},
            )


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
