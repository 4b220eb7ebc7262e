"""The vendor seam: the Backend protocol every vendor module implements, and loading backends by name.

Backends register in the `unidra.backends` entry-point group (Unidra's own ones too), so an
out-of-tree vendor package plugs in exactly like the built-in ones.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from driver import pci
from driver.errors import BackendUnavailable
from driver.model import (
    ContainerEdits,
    Device,
    DeviceSample,
    DeviceSharing,
    HealthEvent,
    Partition,
    PartitionLayout,
    Sharing,
    SharingSupport,
)

ENTRY_POINT_GROUP = "unidra.backends"


@dataclass(frozen=True)
class BackendContext:
    """What a backend gets at construction: where the host is mounted, the node, its own options,
    and a directory of its own on the node for state it keeps (None where it may keep none)."""

    host_root: Path = Path("/")
    node_name: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    state_dir: Path | None = None

    def host_path(self, path: str) -> Path:
        """Map an absolute host path (`/sys/...`) under the host root."""
        return self.host_root / path.lstrip("/")


@runtime_checkable
class Backend(Protocol):
    """One vendor's hardware, seen through Unidra's common device model."""

    name: str

    def discover(self) -> Sequence[Device]:
        """Return every device of this vendor on the node."""
        ...

    def device_edits(self, device: Device) -> ContainerEdits:
        """Container edits for one device (its own device nodes and env)."""
        ...

    def shared_edits(self, devices: Sequence[Device]) -> ContainerEdits:
        """Edits a claim needs once for all of its devices of this backend (control nodes, combined env)."""
        ...


@runtime_checkable
class Partitioner(Protocol):
    """Optional capability: a backend whose devices can be split into partitions (KEP-4815)."""

    def partition_layout(self, device: Device) -> PartitionLayout | None:
        """The counters and partitions of one device; None if it cannot be partitioned."""
        ...

    def partition_edits(self, partition: Partition) -> ContainerEdits:
        """Container edits for one partition."""
        ...


@runtime_checkable
class Sharer(Protocol):
    """Optional capability: devices several allocations can use at once (consumable capacity, KEP-5075)."""

    def sharing_support(self, device: Device) -> SharingSupport | None:
        """What sharing this device allows; None if it cannot be shared."""
        ...

    def sharing_edits(self, device: Device, sharing: Sharing) -> ContainerEdits:
        """Container edits that put one allocation under its strategy and limits."""
        ...


@runtime_checkable
class SharingController(Protocol):
    """Optional capability: sharing that needs the device set up (an MPS daemon, a time slice)."""

    def apply_sharing(self, device: Device, state: DeviceSharing | None) -> None:
        """Bring the device into `state` (None: no longer shared); idempotent, raises
        BackendUnavailable with the reason when it cannot."""
        ...


@runtime_checkable
class HealthSource(Protocol):
    """Optional capability: the vendor's health signals, as a blocking stream run in its own thread."""

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        """Yield events until `stop` is set; may block in the vendor library between events."""
        ...


@runtime_checkable
class Sampler(Protocol):
    """Optional capability: read utilisation, memory, power, energy, temperature and error counters."""

    def sample(self) -> Sequence[DeviceSample]: ...


@runtime_checkable
class FaultInjector(Protocol):
    """Optional capability: devices that can be told to fail, for practice and tests (the simulated backend)."""

    def inject(self, device: str, fault: str) -> HealthEvent: ...

    def recover(self, device: str) -> HealthEvent: ...


BackendFactory = Callable[[BackendContext], Backend]


def available_names() -> list[str]:
    """Names of all backends registered through entry points."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def load_factory(name: str) -> BackendFactory:
    """Find a backend factory by entry-point name, or by an explicit `module:attribute` reference."""
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            factory: BackendFactory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError, TypeError) as err:
            # ValueError and TypeError: not a module name ("", "..x").
            raise BackendUnavailable(f"backend {name!r} cannot be imported: {err}") from err
        return factory
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        loaded: BackendFactory = entry_point.load()
        return loaded
    known = ", ".join(available_names()) or "none (is unidra installed? try `pip install .`)"
    raise BackendUnavailable(f"no backend named {name!r}; registered backends: {known}")


def create(name: str, context: BackendContext) -> Backend:
    """Load and construct one backend; BackendUnavailable carries the one-line reason if it cannot run."""
    factory = load_factory(name)
    try:
        backend = factory(context)
    except TypeError as err:  # a `module:attribute` that is not a backend class
        raise BackendUnavailable(f"backend {name!r} cannot be constructed: {err}") from err
    if not isinstance(backend, Backend):
        raise BackendUnavailable(f"backend {name!r} does not implement the Backend protocol")
    return backend


def create_all(
    names: Sequence[str], context_for: Callable[[str], BackendContext]
) -> tuple[list[Backend], dict[str, str]]:
    """Construct each named backend; a failing one is reported by its one-line reason, not raised."""
    backends: list[Backend] = []
    failures: dict[str, str] = {}
    for name in names:
        try:
            backends.append(create(name, context_for(name)))
        except BackendUnavailable as err:
            failures[name] = str(err)
    return backends, failures


def detect(host_root: Path) -> tuple[list[str], dict[str, str]]:
    """Backends whose PCI functions are present, and for every other backend why it was not picked.

    Only the backend classes are imported here, never a vendor library: that happens when a
    picked backend is constructed.
    """
    functions = pci.scan(host_root)
    picked, reasons = [], {}
    for name in available_names():
        try:
            factory = load_factory(name)
        except BackendUnavailable as err:
            reasons[name] = str(err)
            continue
        matches: Sequence[pci.PciMatch] = getattr(factory, "pci_matches", ())
        if not matches:
            continue  # not hardware-backed (the simulated backend)
        if pci.select(functions, matches):
            picked.append(name)
        else:
            wanted = " or ".join(
                f"0x{m.vendor:04x}"
                + (f" (class {'/'.join(f'0x{c:04x}' for c in m.classes)})" if m.classes else "")
                for m in matches
            )
            where = (
                "/sys/bus/pci/devices"
                if functions
                else f"{host_root / 'sys/bus/pci/devices'} (no PCI devices visible)"
            )
            reasons[name] = f"no PCI device of vendor {wanted} in {where}"
    return picked, reasons
