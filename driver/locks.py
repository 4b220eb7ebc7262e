"""Serialization of prepare/unprepare: per claim, and for the shared checkpoint, in and across processes.

One lock file in the plugin directory carries Linux open-file-description (OFD) byte-range locks:
byte 0 guards the checkpoint, and each claim locks one byte chosen by hashing its UID. Two
driver instances (a rolling upgrade) therefore serialize on the same claim but not on unrelated
ones. OFD locks belong to an open file, not a process, so every holder opens the file itself and
the locks also exclude threads of one process; an in-process lock per key in front keeps waiting
threads off the file and makes same-process waits cheap.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from driver.errors import RetryableError, StorageError

_STATE_OFFSET = 0
_CLAIM_SPACE = 1 << 40


class LockTimeout(RetryableError):
    """Another holder kept a lock longer than we may wait; kubelet retries the call."""


class FileLocks:
    """Per-key exclusive locks over one lock file."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._guard = threading.Lock()
        self._local: dict[int, tuple[threading.Lock, int]] = {}
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    @contextlib.contextmanager
    def claim(self, uid: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock of one claim, waiting at most `timeout` seconds (default: the lock's)."""
        with self._hold(_claim_offset(uid), f"claim {uid}", blocking=True, timeout=timeout):
            yield

    @contextlib.contextmanager
    def state(self) -> Iterator[None]:
        """Hold the checkpoint lock."""
        with self._hold(_STATE_OFFSET, "the checkpoint", blocking=True):
            yield

    @contextlib.contextmanager
    def try_claim(self, uid: str) -> Iterator[bool]:
        """Hold a claim's lock only if it is free right now; yields whether it was taken."""
        try:
            with self._hold(_claim_offset(uid), f"claim {uid}", blocking=False):
                yield True
        except _Busy:
            yield False

    @contextlib.contextmanager
    def _hold(
        self, offset: int, what: str, blocking: bool, timeout: float | None = None
    ) -> Iterator[None]:
        wait = max(0.0, self.timeout if timeout is None else min(timeout, self.timeout))
        local = self._acquire_local(offset)
        deadline = time.monotonic() + wait
        try:
            if not local.acquire(timeout=wait if blocking else 0):
                if blocking:
                    raise LockTimeout(f"timed out after {wait:g}s waiting for the lock of {what}")
                raise _Busy
            try:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                except OSError as err:
                    raise StorageError.from_os("open the lock file", self.path, err) from err
                try:
                    _lock_range(fd, offset, what, deadline if blocking else None)
                    yield
                finally:
                    os.close(fd)  # closing the description releases its OFD locks
            finally:
                local.release()
        finally:
            self._release_local(offset)

    def _acquire_local(self, offset: int) -> threading.Lock:
        with self._guard:
            lock, users = self._local.get(offset, (threading.Lock(), 0))
            self._local[offset] = (lock, users + 1)
            return lock

    def _release_local(self, offset: int) -> None:
        with self._guard:
            lock, users = self._local[offset]
            if users == 1:
                del self._local[offset]
            else:
                self._local[offset] = (lock, users - 1)


class _Busy(Exception):
    pass


def _claim_offset(uid: str) -> int:
    digest = hashlib.blake2b(uid.encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "big") % _CLAIM_SPACE


def _flock(lock_type: int, offset: int) -> bytes:
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (must be 0 for OFD locks).
    return struct.pack("hhqqi4x", lock_type, os.SEEK_SET, offset, 1, 0)


def _lock_range(fd: int, offset: int, what: str, deadline: float | None) -> None:
    request = _flock(fcntl.F_WRLCK, offset)
    pause = 0.0005
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
            return
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):  # held by someone else
                raise
        if deadline is None:
            raise _Busy
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"timed out waiting for the lock of {what}, held by another driver instance"
            )
        # Polling instead of F_OFD_SETLKW keeps the wait bounded; contention across processes
        # only happens during a rolling upgrade, so the pause backs off quickly.
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
