"""Crash-safe files: write to a temp file, fsync, rename over the target, fsync the directory.

A reader therefore sees either the old or the new content, never a mix, even after kill -9 or
power loss. A disk that refuses (full, read-only, no permission) raises StorageError naming the
path; the half-written temp file is removed. Files that recovery rebuilds from durable state
skip the fsyncs (`sync=False`): still atomic, and kept across kill -9 by the page cache.

`Slots` makes a small file's versions durable more cheaply: one in-place write and one
fdatasync into the older of two preallocated slots, where a new file costs two journal commits
(its data and inode, then the rename).
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from driver.errors import StorageError


def write_bytes(path: Path, data: bytes, mode: int = 0o600, sync: bool = True) -> None:
    """Atomically replace `path` with `data`, readable per `mode`; durably unless `sync` is off."""
    with refused_as_storage_error("write", path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fchmod(handle.fileno(), mode)
                if sync:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if sync:
            sync_directory(path.parent)


def remove(path: Path, sync: bool = True) -> bool:
    """Remove `path`, durably unless `sync` is off; a missing file is fine. Returns whether
    something was removed."""
    with refused_as_storage_error("remove", path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        if sync:
            sync_directory(path.parent)
    return True


def sync_file(path: Path) -> None:
    """Persist the contents of a file written without fsync, and its name."""
    with refused_as_storage_error("sync", path):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        sync_directory(path.parent)


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


class Slots:
    """Numbered versions of a small document in two alternating slots of one preallocated file.

    A version goes into the slot the previous one is not in, in place, and one fdatasync makes it
    durable: the blocks exist already, so no file-system metadata has to be committed. A write
    torn by a power loss fails its checksum and the other slot, the previous version, is read.
    A version that outgrows its slot is written to a new, larger file, the slow way.
    """

    # magic, payload length, CRC-32 of generation and payload, generation
    HEADER = struct.Struct("<4sIIQ")
    MAGIC = b"UDS1"
    MINIMUM = 64 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, generation: int, payload: bytes) -> None:
        """Make `payload` durable as version `generation` (higher than any before)."""
        record = (
            self.HEADER.pack(self.MAGIC, len(payload), _crc(generation, payload), generation)
            + payload
        )
        with refused_as_storage_error("write", self.path):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1
            try:
                size = os.fstat(fd).st_size if fd >= 0 else 0
                if len(record) <= size // 2:
                    os.pwrite(fd, record, (generation % 2) * (size // 2))
                    os.fdatasync(fd)
                    return
            finally:
                if fd >= 0:
                    os.close(fd)
        slot = max(self.MINIMUM, 1 << (2 * len(record) - 1).bit_length())
        layout = bytearray(2 * slot)  # zeros written, not a hole: later writes allocate nothing
        start = (generation % 2) * slot
        layout[start : start + len(record)] = record
        write_bytes(self.path, bytes(layout))

    def newest(self) -> tuple[int, bytes] | None:
        """The highest version whose slot is intact, or None."""
        return max(self.versions()[0], default=None)

    def versions(self) -> tuple[list[tuple[int, bytes]], bool]:
        """The intact versions, and whether anything else is there: a slot written but not intact
        (torn by a power loss, or damaged), or a file of the wrong size."""
        with refused_as_storage_error("read", self.path):
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return [], False
        slot = len(data) // 2
        found, damaged = [], len(data) < 2 * self.MINIMUM or len(data) % 2 != 0
        for start in (0, slot):
            header = data[start : start + self.HEADER.size]
            if len(header) < self.HEADER.size:
                continue
            magic, length, crc, generation = self.HEADER.unpack(header)
            payload = data[start + self.HEADER.size : start + self.HEADER.size + length]
            if magic == self.MAGIC and len(payload) == length and crc == _crc(generation, payload):
                found.append((generation, payload))
            elif header.strip(b"\0"):  # a slot never written is all zeros
                damaged = True
        return found, damaged


def _crc(generation: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(generation.to_bytes(8, "little")))
