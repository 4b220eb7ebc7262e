"""Unix socket files as other processes leave them: a live listener, or a file nobody serves."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def listening(path: Path) -> socket.socket:
    """Another process's live socket at `path` (close it to stop)."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.fspath(path))
    server.listen()
    return server


def stale(path: Path) -> None:
    """What kill -9 leaves: the file, and nobody listening."""
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(os.fspath(path))
    dead.close()
