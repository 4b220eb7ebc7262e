"""The on-disk record of prepared claims: versioned JSON with a checksum, written crash-safely.

A claim is recorded only once its CDI spec is on disk, so every entry is a prepared claim whose
answer kubelet may already hold. The file is shared by old and new instances during a rolling
upgrade.

Durability: each version carries a generation number and is renamed into place atomically but
without fsync; the same bytes then go durably into `checkpoint.slots` (durable.Slots: one
in-place write and one fdatasync instead of two journal commits). After a power loss, recovery
takes whichever of the two holds the higher generation. A version without a generation was
written by an instance that keeps no slots (an older Unidra, durably by itself): it is the
newest, because the write that follows it is always made durable in the file itself.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from driver import durable
from driver.claims import Consumer
from driver.errors import StorageError, UnidraError
from driver.locks import FileLocks
from driver.model import Sharing, Strategy

log = logging.getLogger(__name__)

API_VERSION = "unidra.dev/v1"
KIND = "Checkpoint"


class CheckpointCorrupt(UnidraError):
    """The checkpoint file cannot be trusted; the message says why."""


@dataclass(frozen=True)
class PreparedDevice:
    """One device of a prepared claim, with everything needed to answer kubelet again."""

    request: str
    pool: str
    device: str
    cdi_ids: tuple[str, ...]
    admin_access: bool = False
    share_id: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    # What a share consumed of each capacity, and the strategy and limits it was prepared with.
    consumed: Mapping[str, int] = field(default_factory=dict)
    sharing: Sharing | None = None

    @property
    def base_request(self) -> str:
        return self.request.split("/", 1)[0]

    @property
    def exclusive(self) -> bool:
        """Admin-access and shared (consumable-capacity) allocations do not own the device."""
        return not self.admin_access and self.share_id is None


@dataclass(frozen=True)
class PreparedClaim:
    uid: str
    namespace: str
    name: str
    devices: tuple[PreparedDevice, ...]
    consumers: tuple[Consumer, ...] = ()


@dataclass
class Checkpoint:
    boot_id: str = ""
    claims: dict[str, PreparedClaim] = field(default_factory=dict)
    # Of the version read (0: none, or written by an instance that keeps no slots).
    generation: int = 0


def encode(checkpoint: Checkpoint) -> bytes:
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "bootID": checkpoint.boot_id,
        "claims": [_claim_json(checkpoint.claims[uid]) for uid in sorted(checkpoint.claims)],
    }
    if checkpoint.generation:
        body["generation"] = checkpoint.generation
    # The file is the checksummed canonical form with the checksum appended: one encoding, by
    # json's C encoder (indentation would need the pure-Python one). Readers pop the checksum
    # and re-encode the rest, so any key order and spacing reads the same.
    canonical = _canonical(body)
    checksum = json.dumps(_digest(canonical))
    return canonical[:-1] + b',"checksum":' + checksum.encode() + b"}\n"


def decode(data: bytes) -> Checkpoint:
    """Parse and verify a checkpoint; CheckpointCorrupt says precisely what is wrong."""
    try:
        body = json.loads(data)
    except ValueError as err:
        raise CheckpointCorrupt(f"not valid JSON ({err})") from err
    if not isinstance(body, dict):
        raise CheckpointCorrupt("top level is not an object")
    if body.get("kind") != KIND or body.get("apiVersion") != API_VERSION:
        raise CheckpointCorrupt(
            f"unsupported checkpoint {body.get('apiVersion')}/{body.get('kind')}; "
            f"this Unidra reads {API_VERSION}/{KIND}"
        )
    stored = body.pop("checksum", None)
    if stored != _checksum(body):
        raise CheckpointCorrupt("checksum mismatch: the file was modified or partly written")
    try:
        claims = [_claim_from_json(item) for item in body["claims"]]
        return Checkpoint(
            boot_id=str(body["bootID"]),
            claims={c.uid: c for c in claims},
            generation=int(body.get("generation", 0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointCorrupt(f"malformed entry ({err!r})") from err


T = TypeVar("T")


@dataclass
class _Change(Generic[T]):
    """One caller's change waiting for a group commit, and what became of it."""

    apply: Callable[[Checkpoint], T]
    done: bool = False
    result: T | None = None
    error: Exception | None = None


class CheckpointStore:
    """The checkpoint file plus the lock that serializes its read-modify-write cycles."""

    def __init__(self, path: Path, locks: FileLocks) -> None:
        self.path = path
        self.locks = locks
        self.slots = durable.Slots(path.with_suffix(".slots"))
        self._cache: tuple[tuple[int, int, int], Checkpoint] | None = None
        self._queue: list[_Change[Any]] = []
        self._queue_lock = threading.Lock()
        self._committing = threading.Lock()

    def read(self) -> Checkpoint:
        """The current checkpoint (empty if none exists yet); CheckpointCorrupt if unreadable."""
        with durable.refused_as_storage_error("read", self.path):
            try:
                stat = os.stat(self.path)
            except FileNotFoundError:
                return Checkpoint()
            # Every write renames a new file into place, so inode + mtime + size identify a
            # version, including versions written by another instance.
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, decode(self.path.read_bytes()))
        cached = self._cache[1]
        return Checkpoint(cached.boot_id, dict(cached.claims), cached.generation)

    def write(self, checkpoint: Checkpoint) -> None:
        """Replace the checkpoint durably; `checkpoint.generation` is that of the version read."""
        # After a version without a generation (or none), the file itself is made durable: so a
        # version without one is always the newest (see the module docstring).
        foreign = checkpoint.generation == 0
        newest = self.slots.newest() if foreign else None
        generation = max(checkpoint.generation, newest[0] if newest else 0) + 1
        written = Checkpoint(checkpoint.boot_id, dict(checkpoint.claims), generation)
        data = encode(written)
        durable.write_bytes(self.path, data, mode=0o600, sync=foreign)
        if not foreign:
            try:
                self.slots.write(generation, data)
            except StorageError as err:
                # The copy refused (no room to grow it, EIO): the file is already renamed into
                # place, so it must be made durable itself before anyone is told it is recorded.
                log.warning(
                    "checkpoint.slots refused a write; made checkpoint.json durable instead",
                    extra={"error": str(err)},
                )
                durable.sync_file(self.path)
        stat = os.stat(self.path)
        self._cache = ((stat.st_ino, stat.st_mtime_ns, stat.st_size), written)

    def lost(self) -> bool:
        """The file is gone but its durable copy is there: records were lost, not never made."""
        return not self.path.exists() and self.slots.path.exists()

    def restore_from_slots(self) -> str | None:
        """After a crash: put back the durable copy if it is newer than the file (a power loss
        undid the file's last renames), or the file is missing or unreadable; returns why, or
        None if the file stands."""
        with self.locks.state():
            versions, damaged = self.slots.versions()
            if not versions:
                return None
            generation, data = max(versions)
            try:
                current, unreadable = (self.read() if self.path.exists() else None), ""
            except CheckpointCorrupt as err:
                current, unreadable = None, str(err)
            if current is None:
                if damaged:  # the newest version may be the damaged slot: the CDI specs know more
                    return None
                reason = (
                    f"checkpoint.json is corrupt ({unreadable})"
                    if unreadable
                    else "checkpoint.json is missing"
                )
            elif current.generation == 0 or current.generation >= generation:
                return None
            else:
                reason = (
                    f"checkpoint.json is generation {current.generation}, the copy {generation}"
                )
            try:
                decode(data)
            except CheckpointCorrupt:
                return None
            durable.write_bytes(self.path, data, mode=0o600)
            return reason

    def commit(self, apply: Callable[[Checkpoint], T]) -> T:
        """Apply a change to the checkpoint and return once it is durable (group commit).

        Changes that arrive while a write is in progress are applied together by the next
        writer, in one read and one durable write, so concurrent prepares share an fsync instead
        of queueing for the lock one write each. A change that raises is undone and its error
        goes to its caller alone; a write that fails fails every change of its batch.
        """
        change = _Change(apply)
        with self._queue_lock:
            self._queue.append(change)
        with self._committing:
            if not change.done:  # no earlier writer took it: this thread writes the batch
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._write_batch(batch)
        if change.error is not None:
            raise change.error
        return change.result  # type: ignore[return-value]  # set when no error

    def _write_batch(self, batch: list[_Change[Any]]) -> None:
        try:
            with self.update() as checkpoint:
                for change in batch:
                    boot_id, claims = checkpoint.boot_id, dict(checkpoint.claims)
                    try:
                        change.result = change.apply(checkpoint)
                    except Exception as err:
                        change.error = err
                        checkpoint.boot_id, checkpoint.claims = boot_id, claims
        except Exception as err:  # the lock, the read or the write: nothing of the batch landed
            for change in batch:
                change.error = change.error or copy.copy(err)
        finally:
            for change in batch:
                change.done = True

    @contextlib.contextmanager
    def update(self) -> Iterator[Checkpoint]:
        """Lock, read, let the caller change the claims, and write only if something changed."""
        with self.locks.state():
            checkpoint = self.read()
            before = (checkpoint.boot_id, dict(checkpoint.claims))
            yield checkpoint
            if (checkpoint.boot_id, checkpoint.claims) != before:
                self.write(checkpoint)


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _checksum(body: Mapping[str, Any]) -> str:
    return _digest(_canonical(body))


def _digest(canonical: bytes) -> str:
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def _claim_json(claim: PreparedClaim) -> dict[str, Any]:
    return {
        "uid": claim.uid,
        "namespace": claim.namespace,
        "name": claim.name,
        "devices": [
            {
                "request": d.request,
                "pool": d.pool,
                "device": d.device,
                "cdiDeviceIDs": list(d.cdi_ids),
                "adminAccess": d.admin_access,
                "shareID": d.share_id,
                "config": dict(d.config),
                "consumedCapacity": dict(d.consumed),
                "sharing": _sharing_json(d.sharing),
            }
            for d in claim.devices
        ],
        "consumers": [
            {"resource": c.resource, "name": c.name, "uid": c.uid} for c in claim.consumers
        ],
    }


def _claim_from_json(item: Mapping[str, Any]) -> PreparedClaim:
    return PreparedClaim(
        uid=str(item["uid"]),
        namespace=str(item["namespace"]),
        name=str(item["name"]),
        devices=tuple(
            PreparedDevice(
                request=str(d["request"]),
                pool=str(d["pool"]),
                device=str(d["device"]),
                cdi_ids=tuple(str(i) for i in d["cdiDeviceIDs"]),
                admin_access=bool(d["adminAccess"]),
                share_id=d["shareID"],
                config=dict(d["config"]),
                # Absent in checkpoints written before sharing existed.
                consumed={str(k): int(v) for k, v in d.get("consumedCapacity", {}).items()},
                sharing=_sharing_from_json(d.get("sharing")),
            )
            for d in item["devices"]
        ),
        consumers=tuple(
            Consumer(resource=str(c["resource"]), name=str(c["name"]), uid=str(c["uid"]))
            for c in item.get("consumers", [])
        ),
    )


def _sharing_json(sharing: Sharing | None) -> dict[str, Any] | None:
    if sharing is None:
        return None
    return {
        "strategy": sharing.strategy.value,
        "interval": sharing.interval,
        "memoryBytes": sharing.memory_bytes,
        "computeUnits": sharing.compute_units,
        "units": list(sharing.units),
    }


def _sharing_from_json(item: Mapping[str, Any] | None) -> Sharing | None:
    if item is None:
        return None
    return Sharing(
        strategy=Strategy(item["strategy"]),
        interval=str(item["interval"]),
        memory_bytes=int(item["memoryBytes"]),
        compute_units=int(item["computeUnits"]),
        units=tuple(int(u) for u in item["units"]),
    )
