"""PUBLISH: keep this node's ResourceSlices in the API server equal to the desired ones.

A pure planner (`plan`) compares desired and existing slices the way the Go ResourceSlice
controller does and picks the fewest writes: nothing when nothing changed, an in-place update
when one slice changed, otherwise a new pool generation written to every slice. The Publisher
runs the plan in its own thread, retries with capped jittered back-off (never blocking
prepare calls), and a watch wakes it within moments of any external edit or deletion,
including kubelet's wipe of all node slices when it starts.

Only one instance per node publishes (`leading`, see driver.instances), and a token bucket
limits the pool's writes: real changes go out at once, but anything that keeps undoing them is
answered at a trickle instead of a write war.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from driver import quantities, slices, validation
from driver.errors import UnidraError
from driver.kubeapi import Gone, SliceApi, WatchStream
from driver.slices import SliceContent
from driver.supervisor import Backoff

log = logging.getLogger(__name__)

Existing = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """The writes that turn the existing slices into the desired ones."""

    generation: int
    count: int
    creates: tuple[SliceContent, ...] = ()
    updates: tuple[tuple[Existing, SliceContent], ...] = ()
    deletes: tuple[Existing, ...] = ()
    postponed: bool = False  # the write limit held these writes back

    @property
    def writes(self) -> int:
        return len(self.creates) + len(self.updates) + len(self.deletes)


Same = Callable[[Existing, SliceContent, int, int], bool]


def plan(
    existing: Sequence[Existing],
    desired: Sequence[SliceContent],
    same: Same,
    highest_written: int = 0,
) -> Plan:
    """Decide the writes; `same(existing, content, generation, count)` says whether a slice needs no write."""
    generations = [int(item["spec"]["pool"]["generation"]) for item in existing]
    top = max(generations, default=None)
    current = [item for item, gen in zip(existing, generations, strict=True) if gen == top]
    obsolete = tuple(item for item, gen in zip(existing, generations, strict=True) if gen != top)
    pairs, lonely_existing, lonely_desired = _match(current, desired)
    count = len(desired)
    if top is not None and not lonely_existing and not lonely_desired:
        changed = tuple(
            (item, content) for item, content in pairs if not same(item, content, top, count)
        )
        # One changed slice can be rewritten in place: consumers never see a half-updated pool.
        if len(changed) <= 1 and top >= highest_written:
            return Plan(top, count, updates=changed, deletes=obsolete)
    generation = max(top if top is not None else 0, highest_written) + 1
    updates = tuple(
        (item, content) for item, content in pairs if not same(item, content, generation, count)
    )
    return Plan(
        generation, count, tuple(lonely_desired), updates, tuple(lonely_existing) + obsolete
    )


def _match(
    current: Sequence[Existing], desired: Sequence[SliceContent]
) -> tuple[list[tuple[Existing, SliceContent]], list[Existing], list[SliceContent]]:
    if len(current) == 1 and len(desired) == 1:
        return [(current[0], desired[0])], [], []
    by_identity: dict[frozenset[str], list[Existing]] = {}
    for item in current:
        by_identity.setdefault(_identity(item), []).append(item)
    pairs, lonely_desired = [], []
    for content in desired:
        candidates = by_identity.get(content.identity)
        if candidates:
            pairs.append((candidates.pop(0), content))
        else:
            lonely_desired.append(content)
    lonely_existing = [item for group in by_identity.values() for item in group]
    return pairs, lonely_existing, lonely_desired


def _identity(item: Existing) -> frozenset[str]:
    spec = item.get("spec", {})
    return frozenset(
        entry["name"] for entry in (spec.get("devices") or []) + (spec.get("sharedCounters") or [])
    )


def comparable(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A slice spec with quantities as exact numbers and server-set fields removed, for equality tests."""
    result = copy.deepcopy(dict(spec))
    result.pop("pool", None)
    for device in result.get("devices") or []:
        for capacity in (device.get("capacity") or {}).values():
            capacity["value"] = str(quantities.parse(str(capacity["value"])))
            _exact_policy(capacity.get("requestPolicy") or {})
        for consumption in device.get("consumesCounters") or []:
            _exact(consumption.get("counters") or {})
        for taint in device.get("taints") or []:
            taint.pop("timeAdded", None)
    for counter_set in result.get("sharedCounters") or []:
        _exact(counter_set.get("counters") or {})
    return result


def _exact(counters: Mapping[str, Any]) -> None:
    for counter in counters.values():
        counter["value"] = str(quantities.parse(str(counter["value"])))


def _exact_policy(policy: dict[str, Any]) -> None:
    """A capacity's request policy (consumable capacity) with its quantities as exact numbers."""
    if "default" in policy:
        policy["default"] = str(quantities.parse(str(policy["default"])))
    if "validValues" in policy:
        policy["validValues"] = [str(quantities.parse(str(v))) for v in policy["validValues"]]
    for key, value in (policy.get("validRange") or {}).items():
        policy["validRange"][key] = str(quantities.parse(str(value)))


def _consumes(spec: Mapping[str, Any]) -> bool:
    return any(device.get("consumesCounters") for device in spec.get("devices") or [])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class TokenBucket:
    """At most `burst` writes at once, then `per_second`; thread-safe."""

    def __init__(
        self,
        burst: float = 10,
        per_second: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Spend a token if one is there."""
        with self._lock:
            self._refill()
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    def wait(self) -> float:
        """Seconds until a token is there."""
        with self._lock:
            self._refill()
            return max(0.0, (1 - self._tokens) / self.per_second)

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now


def _leading() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class Stats:
    syncs: int = 0
    writes: int = 0
    errors: int = 0
    last_error: str = ""
    generation: int = 0
    postponed: int = 0  # writes the limit held back (each counted every time it held them)
    postponed_in_a_row: int = 0


@dataclass
class Publisher:
    """Reconciles one pool; `wake()` after the desired slices changed."""

    api: SliceApi
    driver: str
    node: str
    desired: Callable[[], list[SliceContent]]
    resync_seconds: float = 300.0
    watch_seconds: int = 300
    stats: Stats = field(default_factory=Stats)
    synced: threading.Event = field(default_factory=threading.Event)
    on_sync: Callable[[Plan], None] | None = None
    on_error: Callable[[str], None] | None = None
    on_postponed: Callable[[int], None] | None = None
    # Set while this instance is the node's publisher; the loops idle while it is clear.
    leading: threading.Event = field(default_factory=_leading)
    limit: TokenBucket = field(default_factory=TokenBucket)

    def __post_init__(self) -> None:
        self._wake = threading.Event()
        self._node_uid: str | None = None
        self._highest_written = 0
        self._own_versions: set[str] = set()
        self._accepted: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stream: WatchStream | None = None
        self._syncing = threading.Lock()
        self.counters_unsupported = False

    def wake(self) -> None:
        self._wake.set()

    def let_go(self) -> None:
        """Stop publishing: no write starts after this returns (the one under way finishes)."""
        self.leading.clear()
        self.interrupt_watch()
        with self._syncing:
            pass

    def interrupt_watch(self) -> None:
        """End the current watch (at shutdown); the watch loop then sees the stop request."""
        stream = self._stream
        if stream is not None:
            stream.close()

    # -- loops, run under driver.supervisor ------------------------------------------------

    def reconcile_loop(self, stop: threading.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            self._wake.clear()
            if not self.leading.is_set():
                self._wake.wait()  # woken when this instance starts leading, or stops
                continue
            try:
                result = self.sync()
                backoff.reset()
                if result.postponed:
                    # Wakes would only find the limit again: wait for the next token.
                    stop.wait(self.limit.wait())
                    continue
                wait = self.resync_seconds
            except UnidraError as err:
                self.stats.errors += 1
                self.stats.last_error = str(err)
                if self.on_error is not None:
                    self.on_error(type(err).__name__)
                wait = backoff.next()
                log.warning(
                    "Publishing ResourceSlices failed; retrying",
                    extra={"error": str(err), "in_seconds": round(wait, 2)},
                )
            self._wake.wait(wait)
            # Coalesce bursts (kubelet deletes all slices one by one) into one sync.
            stop.wait(0.05)

    def watch_loop(self, stop: threading.Event) -> None:
        backoff = Backoff(initial=0.5)
        version = ""
        while not stop.is_set():
            if not self.leading.is_set():
                version = ""
                stop.wait(0.2)
                continue
            try:
                if not version:
                    _, version = self.api.list(self.driver, self.node)
                    self.wake()  # anything may have happened while we were not watching
                self._stream = self.api.watch(self.driver, self.node, version, self.watch_seconds)
                for event in self._stream.events():
                    version = event["object"]["metadata"].get("resourceVersion", version)
                    if event["type"] != "BOOKMARK" and not self._is_own(event):
                        self.wake()
                    if stop.is_set():
                        return
                backoff.reset()
            except Gone:
                version = ""
            except UnidraError as err:
                version = ""
                log.debug("ResourceSlice watch interrupted", extra={"error": str(err)})
                stop.wait(backoff.next())

    # -- one reconciliation ----------------------------------------------------------------

    def sync(self) -> Plan:
        """Make the API match the desired slices; returns what was done (or postponed)."""
        with self._syncing:
            if not self.leading.is_set():
                return Plan(self.stats.generation, 0)
            return self._sync()

    def _sync(self) -> Plan:
        if self._node_uid is None:
            self._node_uid = self.api.node_uid(self.node)
        desired = self.desired()
        if self.counters_unsupported:
            desired = slices.without_partitions(desired)
        existing, _ = self.api.list(self.driver, self.node)
        result = plan(existing, desired, self._same, self._highest_written)
        objects = [self._object(content, result) for content in desired]
        validation.check_pool(objects)
        if result.writes and not self.limit.take():
            if not self.stats.postponed_in_a_row:
                log.warning(
                    "ResourceSlice writes are being postponed by the write limit: is something "
                    "else changing this node's slices?",
                    extra={"writes": result.writes, "in_seconds": round(self.limit.wait(), 2)},
                )
            self.stats.postponed += result.writes
            self.stats.postponed_in_a_row += 1
            if self.on_postponed is not None:
                self.on_postponed(result.writes)
            return dataclasses.replace(result, postponed=True)
        self.stats.postponed_in_a_row = 0
        for item, content in result.updates:
            body = self._object(content, result)
            body["metadata"].update(
                name=item["metadata"]["name"], resourceVersion=item["metadata"]["resourceVersion"]
            )
            body["metadata"].pop("generateName", None)
            self._remember(content, self.api.replace(item["metadata"]["name"], body))
        for content in result.creates:
            self._remember(content, self.api.create(self._object(content, result)))
        for item in result.deletes:
            meta = item["metadata"]
            self.api.delete(meta["name"], meta["uid"], meta["resourceVersion"])
        self._highest_written = max(self._highest_written, result.generation)
        self.stats.syncs += 1
        self.stats.writes += result.writes
        self.stats.generation = result.generation
        if result.writes:
            log.info(
                "Published ResourceSlices",
                extra={
                    "generation": result.generation,
                    "slices": result.count,
                    "creates": len(result.creates),
                    "updates": len(result.updates),
                    "deletes": len(result.deletes),
                },
            )
        if self.on_sync is not None:
            self.on_sync(result)
        self.synced.set()
        return result

    def _object(self, content: SliceContent, result: Plan) -> dict[str, Any]:
        return slices.slice_object(
            content,
            driver=self.driver,
            node=self.node,
            node_uid=self._node_uid,
            generation=result.generation,
            count=result.count,
        )

    def _same(self, item: Existing, content: SliceContent, generation: int, count: int) -> bool:
        spec = item.get("spec", {})
        pool = spec.get("pool", {})
        owners = item.get("metadata", {}).get("ownerReferences") or []
        if pool.get("generation") != generation or pool.get("resourceSliceCount") != count:
            return False
        if spec.get("driver") != self.driver or spec.get("nodeName") != self.node:
            return False
        if self._node_uid and not any(
            o.get("kind") == "Node" and o.get("uid") == self._node_uid for o in owners
        ):
            return False
        stored = comparable(spec)
        wanted = comparable({"driver": self.driver, "nodeName": self.node, **content.spec_fields()})
        return stored == wanted or stored == self._accepted.get(_digest(wanted))

    def _remember(self, content: SliceContent, stored: dict[str, Any]) -> None:
        """Note our own write, and whether the server kept everything we sent."""
        with self._lock:
            if len(self._own_versions) > 1000:  # events were missed (no watch); forget old ones
                self._own_versions.clear()
            self._own_versions.add(str(stored.get("metadata", {}).get("resourceVersion")))
        wanted = comparable({"driver": self.driver, "nodeName": self.node, **content.spec_fields()})
        kept = comparable(stored.get("spec", {}))
        if kept == wanted:
            return
        if (wanted.get("sharedCounters") and not kept.get("sharedCounters")) or (
            _consumes(wanted) and not _consumes(kept)
        ):
            if not self.counters_unsupported:
                log.error(
                    "The API server dropped the shared counters of partitionable devices; publishing whole "
                    "devices only. Partitions need Kubernetes 1.35+ with DRAPartitionableDevices enabled",
                )
            self.counters_unsupported = True
            self.wake()
            return
        # Another disabled feature gate (device taints...) made the server drop fields. Accept
        # what it stored, or every sync would rewrite the slice forever.
        self._accepted[_digest(wanted)] = kept
        log.error(
            "The API server dropped fields of a ResourceSlice; is a feature gate off?",
            extra={"slice": stored.get("metadata", {}).get("name")},
        )

    def _is_own(self, event: Mapping[str, Any]) -> bool:
        """Whether an ADDED or MODIFIED event only echoes one of our own writes."""
        if event.get("type") not in ("ADDED", "MODIFIED"):
            return False
        version = str(event.get("object", {}).get("metadata", {}).get("resourceVersion"))
        with self._lock:
            if version in self._own_versions:
                self._own_versions.discard(version)
                return True
        return False
