"""DISCOVER: ask every backend for its devices and merge them into one immutable inventory.

A backend that fails is reported with its one-line reason and the others carry on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from driver.backends import Backend
from driver.errors import BackendUnavailable
from driver.model import Device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inventory:
    """All devices of this node, sorted by name, with the backend that owns each."""

    by_name: Mapping[str, Device]
    backends: Mapping[str, Backend]
    failures: Mapping[str, str] = field(default_factory=dict)

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(self.by_name.values())

    def get(self, name: str) -> Device | None:
        return self.by_name.get(name)

    def backend_of(self, device: Device) -> Backend:
        return self.backends[device.backend]


def discover(backends: Sequence[Backend]) -> Inventory:
    """Run discovery on every backend; device names must be unique across all of them."""
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
    return Inventory(by_name=ordered, backends=working, failures=failures)
