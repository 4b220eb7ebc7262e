"""One owner per node: which instance serves which sockets, and which one publishes.

Instances coordinate through flock(2) locks on files in the plugin directory. The kernel drops a
lock when its holder exits, even by kill -9, so a held lock means a live holder:

- `instance.lock` (`instance-<podUID>.lock` in rolling-upgrade mode) is held for an instance's
  whole life. Its holder owns the sockets of that name, so a socket file found there at start
  was left by a dead holder. An instance without a pod UID claims the node for itself and also
  refuses to start while any other instance lives.
- `publisher.lock` is held by the one instance that writes the node's ResourceSlices and saved
  health; the others serve kubelet and take over when it lets go or dies.

Each lock file holds its holder's record, so a refused instance can name the other one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from driver.errors import FatalError, StorageError

PUBLISHER_LOCK = "publisher.lock"
# Probing another instance's lock holds it for microseconds; a contender retries this long.
CONTENTION_SECONDS = 0.5


@dataclass(frozen=True)
class InstanceRecord:
    """Who holds a lock: enough for an operator to find the other instance."""

    pid: int
    started: str
    host: str
    pod_uid: str
    sockets: tuple[str, ...]

    @classmethod
    def of_this_process(cls, pod_uid: str | None, sockets: Sequence[Path]) -> InstanceRecord:
        return cls(
            pid=os.getpid(),
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            host=socket.gethostname(),
            pod_uid=pod_uid or "",
            sockets=tuple(str(path) for path in sockets),
        )

    def describe(self) -> str:
        pod = f", pod UID {self.pod_uid}" if self.pod_uid else ""
        serving = f", serving {self.sockets[0]}" if self.sockets else ""
        return f"pid {self.pid} on host {self.host}{pod}, started {self.started}{serving}"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> InstanceRecord | None:
        try:
            body = json.loads(data)
            return cls(
                pid=int(body["pid"]),
                started=str(body["started"]),
                host=str(body["host"]),
                pod_uid=str(body["pod_uid"]),
                sockets=tuple(str(s) for s in body["sockets"]),
            )
        except (ValueError, KeyError, TypeError):
            return None  # still being written, or not ours


class Lease:
    """An exclusive flock(2) on one file, with the holder's record in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, record: InstanceRecord, wait: float = 0.0) -> bool:
        """Take the lock if it is free within `wait` seconds, and write our record into it."""
        deadline = time.monotonic() + wait
        while True:
            fd = self._locked_descriptor()
            if fd is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, record.encode(), 0)
                self._fd = fd
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def holder(self) -> InstanceRecord | None:
        try:
            return InstanceRecord.decode(self.path.read_bytes())
        except OSError:
            return None

    def release(self, remove: bool = False) -> None:
        """Let go; `remove` deletes the file first, while still holding it (see _locked_descriptor)."""
        if self._fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def remove_if_free(self) -> bool:
        """Delete the file if nobody holds it (its holder died); returns whether it was free."""
        fd = self._locked_descriptor()
        if fd is None:
            return False
        self._fd = fd
        self.release(remove=True)
        return True

    def _locked_descriptor(self) -> int | None:
        """A descriptor of the file holding its lock, or None while another holder has it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise StorageError.from_os("open the lock file", self.path, err) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            # The last holder may have removed the file between our open and our lock: then we
            # hold the lock of a file nobody else can find, and start over with the current one.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (
                mine.st_dev,
                mine.st_ino,
            ):
                return fd
            os.close(fd)


def claim_instance(plugin_dir: Path, pod_uid: str | None, record: InstanceRecord) -> Lease:
    """Become the owner of this instance's sockets, or raise FatalError naming the live owner.

    Lock files that dead instances left behind are removed on the way.
    """
    own = Lease(plugin_dir / (f"instance-{pod_uid}.lock" if pod_uid else "instance.lock"))
    if not own.try_acquire(record, wait=CONTENTION_SECONDS):
        raise FatalError(_refusal(own.holder(), own.path))
    try:
        others = _live_others(plugin_dir, own.path)
        if others and not pod_uid:
            raise FatalError(_refusal(others[0].holder(), others[0].path))
    except BaseException:
        own.release(remove=True)
        raise
    return own


def publisher_lease(plugin_dir: Path) -> Lease:
    return Lease(plugin_dir / PUBLISHER_LOCK)


def _live_others(plugin_dir: Path, own: Path) -> list[Lease]:
    """The locks of the other live instances; the lock files of dead ones are removed."""
    others = (Lease(path) for path in sorted(plugin_dir.glob("instance*.lock")) if path != own)
    return [other for other in others if not other.remove_if_free()]


def _refusal(other: InstanceRecord | None, path: Path) -> str:
    who = other.describe() if other else f"one still starting (it holds {path})"
    return (
        f"another Unidra instance runs on this node: {who}; stop it first "
        "(only a rolling upgrade runs two instances, each with its own POD_UID)"
    )
