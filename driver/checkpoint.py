"""The on-disk record of prepared claims: versioned JSON with a checksum, written crash-safely.

A claim is recorded only once its CDI spec is durably on disk, so every entry is a prepared
claim whose answer kubelet may already hold. The file is shared by old and new instances during
a rolling upgrade.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driver import durable
from driver.claims import Consumer
from driver.errors import UnidraError
from driver.locks import FileLocks
from driver.model import Sharing, Strategy

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


def encode(checkpoint: Checkpoint) -> bytes:
    body = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "bootID": checkpoint.boot_id,
        "claims": [_claim_json(checkpoint.claims[uid]) for uid in sorted(checkpoint.claims)],
    }
    body["checksum"] = _checksum(body)
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


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
        return Checkpoint(boot_id=str(body["bootID"]), claims={c.uid: c for c in claims})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointCorrupt(f"malformed entry ({err!r})") from err


class CheckpointStore:
    """The checkpoint file plus the lock that serializes its read-modify-write cycles."""

    def __init__(self, path: Path, locks: FileLocks) -> None:
        self.path = path
        self.locks = locks
        self._cache: tuple[tuple[int, int, int], Checkpoint] | None = None

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
        return Checkpoint(boot_id=cached.boot_id, claims=dict(cached.claims))

    def write(self, checkpoint: Checkpoint) -> None:
        durable.write_bytes(self.path, encode(checkpoint), mode=0o600)
        stat = os.stat(self.path)
        written = Checkpoint(boot_id=checkpoint.boot_id, claims=dict(checkpoint.claims))
        self._cache = ((stat.st_ino, stat.st_mtime_ns, stat.st_size), written)

    @contextlib.contextmanager
    def update(self) -> Iterator[Checkpoint]:
        """Lock, read, let the caller change the claims, and write only if something changed."""
        with self.locks.state():
            checkpoint = self.read()
            before = (checkpoint.boot_id, dict(checkpoint.claims))
            yield checkpoint
            if (checkpoint.boot_id, checkpoint.claims) != before:
                self.write(checkpoint)


def _checksum(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
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
