"""DISCOVER: ask every backend for its devices and merge them into one immutable inventory.

A backend that fails is reported with its one-line reason and the others carry on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from driver import sharing
from driver.backends import Backend, Partitioner, Sharer
from driver.errors import BackendUnavailable
from driver.model import Device, Partition, PartitionLayout, SharingSupport
from driver.sharing import SharingPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inventory:
    """All devices of this node, sorted by name, with the backend that owns each."""

    by_name: Mapping[str, Device]
    backends: Mapping[str, Backend]
    failures: Mapping[str, str] = field(default_factory=dict)
    layouts: Mapping[str, PartitionLayout] = field(default_factory=dict)
    # What sharing each device allows (any device whose backend can share it), and the devices
    # published as shareable (--sharing and its per-backend narrowing).
    sharing: Mapping[str, SharingSupport] = field(default_factory=dict)
    shareable: frozenset[str] = frozenset()

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(self.by_name.values())

    @property
    def partitions(self) -> dict[str, Partition]:
        return {p.name: p for layout in self.layouts.values() for p in layout.partitions}

    def get(self, name: str) -> Device | None:
        return self.by_name.get(name)

    def allocatable(self, name: str) -> Device | Partition | None:
        """A whole device, or a partition when partitions are published."""
        return self.by_name.get(name) or self.partitions.get(name)

    def backend_of(self, device: Device) -> Backend:
        return self.backends[device.backend]


def discover(
    backends: Sequence[Backend],
    partitions: bool = False,
    policy: SharingPolicy | None = None,
) -> Inventory:
    """Run discovery on every backend; device names must be unique across all of them.

    With `partitions`, devices whose backend can partition them also get their layout; with a
    sharing policy, the devices it names are published as shareable where their backend can
    share them.
    """
    devices: dict[str, Device] = {}
    failures: dict[str, str] = {}
    working: dict[str, Backend] = {}
    for backend in backends:
        try:
            found = list(backend.discover())
        except BackendUnavailable as err:
            failures[backend.name] = str(err)
            log.warning("Backend unavailable", extra={"backend": backend.name, "reason": str(err)})
            continue
        working[backend.name] = backend
        for device in found:
            other = devices.get(device.name)
            if other is not None:
                raise BackendUnavailable(
                    f"device {device.name} is reported by both {other.backend} and {backend.name}; "
                    "select one of them with --vendors"
                )
            devices[device.name] = device
    ordered = {name: devices[name] for name in sorted(devices)}
    layouts: dict[str, PartitionLayout] = {}
    if partitions:
        for name, device in ordered.items():
            backend = working[device.backend]
            layout = backend.partition_layout(device) if isinstance(backend, Partitioner) else None
            if layout is not None:
                layouts[name] = layout
    supports: dict[str, SharingSupport] = {}
    for name, device in ordered.items():
        backend = working[device.backend]
        support = backend.sharing_support(device) if isinstance(backend, Sharer) else None
        if support is not None:
            supports[name] = support
    policy = policy or SharingPolicy()
    shareable = frozenset(
        name
        for name, device in ordered.items()
        if policy.shares(device) and sharing.publishable(device, supports.get(name))
    )
    return Inventory(
        by_name=ordered,
        backends=working,
        failures=failures,
        layouts=layouts,
        sharing=supports,
        shareable=shareable,
    )


def partitions_warning(backends: Sequence[Backend]) -> str | None:
    """With --partitions: one line naming the running backends that publish no partitions, or None.

    Only backends that can prepare a partition publish any; the others still publish the
    partitions that already exist on the hardware (MIG devices, AMD CPX partitions) as devices.
    """
    missing = sorted(b.name for b in backends if not isinstance(b, Partitioner))
    if not missing:
        return None
    return (
        f"--partitions: the {', '.join(missing)} backend{'s' if len(missing) > 1 else ''} "
        "cannot create partitions at prepare, so publish none; partitions that already exist "
        "(MIG devices, AMD compute partitions) are published as devices"
    )


class LiveInventory:
    """The current inventory, swapped atomically when rediscovery finds a change (hot-plug)."""

    def __init__(
        self,
        backends: Sequence[Backend],
        partitions: bool = False,
        policy: SharingPolicy | None = None,
    ) -> None:
        self._backends = list(backends)
        self._partitions = partitions
        self._policy = policy
        self._lock = threading.Lock()
        self._current = discover(self._backends, partitions, policy)

    def current(self) -> Inventory:
        with self._lock:
            return self._current

    def refresh(self) -> tuple[list[str], list[str], list[str]]:
        """Rediscover; returns the names of added, removed and changed devices (all empty: no change)."""
        fresh = discover(self._backends, self._partitions, self._policy)
        with self._lock:
            old = self._current
            added = sorted(set(fresh.by_name) - set(old.by_name))
            removed = sorted(set(old.by_name) - set(fresh.by_name))
            changed = sorted(
                name
                for name in set(fresh.by_name) & set(old.by_name)
                if fresh.by_name[name] != old.by_name[name]
                or fresh.layouts.get(name) != old.layouts.get(name)
                or fresh.sharing.get(name) != old.sharing.get(name)
                or (name in fresh.shareable) != (name in old.shareable)
            )
            if added or removed or changed:
                self._current = fresh
        if added or removed or changed:
            log.info(
                "Devices changed", extra={"added": added, "removed": removed, "changed": changed}
            )
        return added, removed, changed
