"""The control socket: `unidra simulate inject|recover|health` talk to the running daemon through it.

One JSON request per connection on `<plugin-dir>/control.sock`, readable and writable by root
only; the answer is one JSON object. Faults reach only backends that accept them (simulated).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from driver.errors import UnidraError
from driver.socket_files import SocketFile, clear_stale

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST = 64 * 1024


class ControlServer:
    def __init__(self, path: Path, handle: Handler) -> None:
        self.path = path
        self.handle = handle
        clear_stale(path)
        outer = self

        class _Request(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(MAX_REQUEST)
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    answer = outer.handle(request)
                except (ValueError, UnidraError) as err:
                    answer = {"error": str(err)}
                except Exception as err:
                    log.exception("Control request failed")
                    answer = {"error": f"internal error: {err}"}
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        self._server = socketserver.ThreadingUnixStreamServer(str(path), _Request)
        self._server.daemon_threads = True
        self._bound = SocketFile.bound_at(path)
        os.chmod(path, 0o600)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="control-socket",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._bound.remove()


def request(path: Path, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a running daemon; UnidraError when it is not there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(str(path))
            client.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError as err:
        raise UnidraError(
            f"no daemon control socket at {path}: is `unidra kubelet-plugin` running here?"
        ) from err
    except PermissionError as err:
        raise UnidraError(f"no permission to use {path}: run as root") from err
    except OSError as err:
        raise UnidraError(f"cannot talk to the daemon at {path}: {err}") from err
    answer: dict[str, Any] = json.loads(data or b"{}")
    return answer


def answering(paths: Iterable[Path]) -> list[Path]:
    """The control sockets whose daemon answers; sockets left by dead instances are skipped."""
    alive = []
    for path in paths:
        try:
            request(path, {"command": "health"}, timeout=5)
        except UnidraError:
            continue
        alive.append(path)
    return alive


def choose(candidates: Sequence[Path], where: Path) -> Path:
    """The one answering daemon among `candidates` (the control sockets in `where`); never a guess."""
    alive = answering(candidates)
    if not alive:
        raise UnidraError(
            f"no daemon answers in {where}: is `unidra kubelet-plugin` running here "
            "(with the same --driver-name and --kubelet-plugins-directory-path)?"
        )
    if len(alive) > 1:
        names = ", ".join(p.name for p in alive)
        raise UnidraError(
            f"{len(alive)} daemons answer in {where} ({names}); "
            "name one with --pod-uid UID or --socket PATH"
        )
    return alive[0]


def describe(answer: Mapping[str, Any]) -> str:
    """One line for an inject or recover answer, saying when the device's state will change."""
    what = " ".join(str(p) for p in (answer["kind"], answer.get("code")) if p)
    if not answer["healthy"]:
        return f"{answer['device']}: {what}: unhealthy"
    hold = float(answer.get("hold_seconds") or 0)
    if hold > 0:
        return (
            f"{answer['device']}: recovery reported; it stays unhealthy (and tainted) "
            f"{hold:.0f} s more, the minimum hold after a fault, then clears"
        )
    return f"{answer['device']}: recovered (healthy)"
