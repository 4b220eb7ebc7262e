"""Claim device status (KEP-4817): our devices in a claim's `status.devices`, kept current with their health.

Writes happen in a background thread from a queue, once a burst of prepares has settled, so a
slow or failing API server never delays or fails a prepare. A claim prepared and unprepared
again before its status was written has nothing to show and costs no API call. Entries of
other drivers are kept; ours are replaced; a conflict re-reads the claim and tries again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from driver.checkpoint import CheckpointStore, PreparedClaim
from driver.claims import ClaimRef
from driver.errors import ClaimError, UnidraError
from driver.health import HealthBoard
from driver.inventory import Inventory
from driver.kubeapi import ClaimStatusApi, Conflict
from driver.model import Device, HealthStatus, Partition
from driver.supervisor import Backoff

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
SETTLE_SECONDS = 0.05
MAX_BATCH_SECONDS = 1.0  # under sustained prepares, write at least this often

# Why a claim is queued: the writes differ only in what a prepare followed by an unprepare can cancel.
PREPARED, UNPREPARED, RECHECK = "prepared", "unprepared", "recheck"


class ClaimStatusWriter:
    def __init__(
        self,
        *,
        api: ClaimStatusApi,
        driver: str,
        pool: str,
        store: CheckpointStore,
        board: HealthBoard,
        inventory: Callable[[], Inventory],
    ) -> None:
        self.api = api
        self.driver = driver
        self.pool = pool
        self.store = store
        self.board = board
        self.inventory = inventory
        self._queue: queue.Queue[tuple[ClaimRef, int, str]] = queue.Queue()
        self._health: dict[str, tuple[HealthStatus, str]] = {}
        self._current: set[str] = (
            set()
        )  # claim UIDs whose status we wrote; health changes requeue them
        self.writes = 0
        self.failures = 0

    def prepared(self, ref: ClaimRef) -> None:
        if ref.uid not in self._current:  # kubelet repeating a prepare costs no API call
            self._queue.put((ref, 0, PREPARED))

    def unprepared(self, ref: ClaimRef) -> None:
        self._current.discard(ref.uid)
        self._queue.put((ref, 0, UNPREPARED))

    def health_changed(self) -> None:
        """Re-write the claims whose devices changed health."""
        checkpoint = self.store.read()
        for claim in checkpoint.claims.values():
            if not claim.namespace:
                continue
            now = {d.device: self.board.status(self._health_name(d.device)) for d in claim.devices}
            if any(
                self._health.get(f"{claim.uid}/{name}") != status for name, status in now.items()
            ):
                self._queue.put((ClaimRef(claim.namespace, claim.name, claim.uid), 0, RECHECK))

    def loop(self, stop: threading.Event) -> None:
        backoff = Backoff(initial=0.5, cap=30.0)
        while not stop.is_set():
            for ref, attempt in self._batch(stop).values():
                try:
                    self._write(ref)
                    backoff.reset()
                except ClaimError as err:
                    log.info(
                        "Claim status not written", extra={"claim": str(ref), "reason": str(err)}
                    )
                except UnidraError as err:
                    self.failures += 1
                    if attempt + 1 < MAX_ATTEMPTS:
                        stop.wait(backoff.next())
                        self._queue.put((ref, attempt + 1, RECHECK))
                    else:
                        log.warning(
                            "Giving up on a claim status update",
                            extra={"claim": str(ref), "error": str(err)},
                        )

    def _batch(self, stop: threading.Event) -> dict[str, tuple[ClaimRef, int]]:
        """The claims to write, one entry each, once requests have settled for SETTLE_SECONDS
        (or MAX_BATCH_SECONDS after the first one, so sustained load cannot starve them).

        Writing waits out a burst of prepares rather than competing with them for the
        interpreter, and a claim asked for twice in the burst is written once. A claim whose
        prepare is in the batch and whose status we never wrote needs nothing when it is
        unprepared again: it leaves the batch.
        """
        batch: dict[str, tuple[ClaimRef, int, str]] = {}
        deadline = float("inf")
        while not stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                return {uid: (ref, attempt) for uid, (ref, attempt, _) in batch.items()}
            try:
                ref, attempt, why = self._queue.get(
                    timeout=min(SETTLE_SECONDS, deadline - now) if deadline < float("inf") else 0.2
                )
            except queue.Empty:
                if batch:
                    return {uid: (ref, attempt) for uid, (ref, attempt, _) in batch.items()}
                continue
            if deadline == float("inf"):
                deadline = time.monotonic() + MAX_BATCH_SECONDS
            queued = batch.get(ref.uid)
            if why == UNPREPARED and queued is not None and queued[2] == PREPARED:
                del batch[ref.uid]  # never written, now unprepared: nothing to show or remove
                continue
            if queued is not None:
                attempt, why = max(attempt, queued[1]), (why if why != PREPARED else queued[2])
            batch[ref.uid] = (ref, attempt, why)
        return {uid: (ref, attempt) for uid, (ref, attempt, _) in batch.items()}

    def _write(self, ref: ClaimRef) -> None:
        for _ in range(3):
            claim = self.api.get(ref.namespace, ref.name)
            if claim.get("metadata", {}).get("uid") != ref.uid:
                return  # replaced or gone: nothing of ours to show
            prepared = self.store.read().claims.get(ref.uid)
            ours = self._entries(prepared, claim) if prepared else []
            status = claim.setdefault("status", {})
            others = [
                d
                for d in status.get("devices") or []
                if d.get("driver") != self.driver or d.get("pool") != self.pool
            ]
            wanted = others + ours
            changed = wanted != (status.get("devices") or [])
            if changed:
                status["devices"] = wanted
                try:
                    self.api.replace_status(ref.namespace, ref.name, claim)
                except Conflict:
                    continue
            if ours:
                self._current.add(ref.uid)
            self.writes += changed
            return
        raise Conflict(f"the status of claim {ref} kept changing under us")

    def _entries(self, prepared: PreparedClaim, claim: Mapping[str, Any]) -> list[dict[str, Any]]:
        existing = {
            (d.get("device"), d.get("shareID")): d
            for d in claim.get("status", {}).get("devices") or []
            if d.get("driver") == self.driver
        }
        inventory = self.inventory()
        entries = []
        for device in prepared.devices:
            health, message = self.board.status(self._health_name(device.device))
            self._health[f"{prepared.uid}/{device.device}"] = (health, message)
            previous = existing.get((device.device, device.share_id), {})
            conditions = [
                _condition(
                    previous,
                    "Ready",
                    health is not HealthStatus.UNHEALTHY,
                    "Prepared" if health is not HealthStatus.UNHEALTHY else "DeviceUnhealthy",
                    message or "prepared for the claim's containers",
                ),
                _condition(
                    previous,
                    "Healthy",
                    {HealthStatus.HEALTHY: "True", HealthStatus.UNHEALTHY: "False"}.get(
                        health, "Unknown"
                    ),
                    {
                        HealthStatus.HEALTHY: "DeviceHealthy",
                        HealthStatus.UNHEALTHY: "DeviceUnhealthy",
                    }.get(health, "NoHealthSignal"),
                    message or str(health),
                ),
            ]
            entry: dict[str, Any] = {
                "driver": self.driver,
                "pool": device.pool,
                "device": device.device,
            }
            if device.share_id:
                entry["shareID"] = device.share_id
            entry["conditions"] = conditions
            entry["data"] = _data(inventory.allocatable(device.device), health)
            entries.append(entry)
        return entries

    def _health_name(self, device: str) -> str:
        """Partitions share their parent's health."""
        item = self.inventory().allocatable(device)
        return item.parent.name if isinstance(item, Partition) else device


def _condition(
    previous: Mapping[str, Any], kind: str, status: bool | str, reason: str, message: str
) -> dict[str, Any]:
    value = status if isinstance(status, str) else ("True" if status else "False")
    before = next((c for c in previous.get("conditions") or [] if c.get("type") == kind), None)
    # lastTransitionTime moves only when the status does.
    if before is None or before.get("status") != value:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    else:
        when = str(before["lastTransitionTime"])
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message[:1024],
        "lastTransitionTime": when,
    }


def _data(item: Device | Partition | None, health: HealthStatus) -> dict[str, Any]:
    """What consumers such as KubeVirt can use without asking the driver."""
    if item is None:
        return {"health": str(health)}
    device = item.parent if isinstance(item, Partition) else item
    data: dict[str, Any] = {"vendor": device.vendor, "model": device.model, "health": str(health)}
    if device.uuid and not isinstance(item, Partition):
        data["uuid"] = device.uuid
    if device.pci_bus_id:
        data["pciBusID"] = device.pci_bus_id
    if isinstance(item, Partition):
        data["parentUUID"] = device.uuid
        data["partitionProfile"] = item.profile
    return data
