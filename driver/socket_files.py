"""Unix socket files on a shared directory: is a live process serving this one, and remove only
the one we created.

A socket file outlives a killed process. Connecting tells the two apart: a dead one refuses, a
live one accepts. Removing by path alone could remove a file another process bound since, so a
server remembers the device, inode and modification time of what it bound and removes only that.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from driver.errors import FatalError

PROBE_SECONDS = 1.0


@dataclass(frozen=True)
class SocketFile:
    """One socket file as bound by this process."""

    path: Path
    identity: tuple[int, int, int]

    @classmethod
    def bound_at(cls, path: Path) -> SocketFile:
        return cls(path, _identity(os.lstat(path)))

    def remove(self) -> bool:
        """Unlink the path if it is still the file we bound; returns whether it was removed."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if _identity(info) != self.identity:
            return False  # another process bound a socket here since: it is theirs
        os.unlink(self.path)
        return True


def clear_stale(path: Path) -> bool:
    """Remove a socket a dead process left behind; returns whether there was one.

    A socket that still accepts connections belongs to a live process and is never removed:
    FatalError. So is anything at the path that is not a socket.
    """
    if not _socket_at(path):
        return False
    if served(path):
        raise FatalError(
            f"{path} is served by another live process; stop it first (only a rolling upgrade "
            "runs two instances, each with its own POD_UID)"
        )
    os.unlink(path)
    return True


def remove_any(path: Path) -> bool:
    """Remove a socket file whoever serves it (`unidra cleanup --force`); refuse anything else."""
    if not _socket_at(path):
        return False
    os.unlink(path)
    return True


def _socket_at(path: Path) -> bool:
    """Whether a socket file is at `path`; FatalError for anything else there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise FatalError(
            f"{path} exists and is not a socket; remove it or choose another directory"
        )
    return True


def served(path: Path) -> bool:
    """Whether a live process accepts connections on the socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_SECONDS)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except TimeoutError:
            return True  # a listener with a full backlog is alive
        except OSError as err:
            raise FatalError(f"cannot tell whether {path} is in use: {err.strerror}") from err
        return True


def _identity(info: os.stat_result) -> tuple[int, int, int]:
    # The modification time tells a new file from an old one that reused the inode number.
    return info.st_dev, info.st_ino, info.st_mtime_ns
