"""Crash-safe files: write to a temp file, fsync, rename over the target, fsync the directory.

A reader therefore sees either the old or the new content, never a mix, even after kill -9 or
power loss. A disk that refuses (full, read-only, no permission) raises StorageError naming the
path; the half-written temp file is removed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from driver.errors import StorageError


def write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace `path` with `data`, readable per `mode`."""
    with refused_as_storage_error("write", path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fchmod(handle.fileno(), mode)
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        sync_directory(path.parent)


def remove(path: Path) -> bool:
    """Remove `path` durably; a missing file is fine. Returns whether something was removed."""
    with refused_as_storage_error("remove", path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        sync_directory(path.parent)
    return True


def sync_directory(directory: Path) -> None:
    """Persist renames and unlinks in `directory`."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path, prefix: str) -> list[Path]:
    """Delete temp files a crash left behind while writing files whose names start with `prefix`."""
    removed = []
    for candidate in directory.glob(f".{prefix}*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def refused_as_storage_error(action: str, path: Path) -> Iterator[None]:
    """Turn the disk's OSError into a StorageError that names `path` and the cause."""
    try:
        yield
    except OSError as err:
        raise StorageError.from_os(action, path, err) from err
