"""The vendor-neutral device model every backend fills in and the core consumes.

Backends return these frozen dataclasses, never attribute dicts: only the core turns them into
published attributes, which is what keeps one vocabulary across vendors.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

AttributeValue = bool | int | str
_H = TypeVar("_H", bound=Hashable)


class DeviceType(enum.StrEnum):
    """The closed set of accelerator kinds (published as the `type` attribute)."""

    GPU = "gpu"
    NPU = "npu"
    TPU = "tpu"
    HPU = "hpu"


@dataclass(frozen=True, slots=True)
class Interconnect:
    """A device-to-device fabric: devices sharing `domain` can talk over `technology`."""

    technology: str
    domain: str


@dataclass(frozen=True, slots=True)
class OfferedProfile:
    """A partition profile a device's library reports (NVML's GPU instance profiles), and how many fit."""

    name: str
    instances: int
    compute_units: int | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Device:
    """One allocatable accelerator as discovered on this node."""

    backend: str
    vendor: str
    type: DeviceType
    model: str
    architecture: str
    uuid: str  # "" when the device cannot tell (published without a uuid attribute)
    index: int | None  # the vendor library's index; None when the library does not list the device
    # None when the device could not tell: omitted from the slice, never published as 0.
    memory_bytes: int | None
    compute_units: int | None
    pci_bus_id: str | None = None
    pcie_root: str | None = None
    numa_node: int | None = None
    driver_version: str | None = None
    firmware_version: str | None = None
    compute_capability: str | None = None
    compute_target: str | None = None
    precisions: frozenset[str] = frozenset()
    interconnect: Interconnect | None = None
    peers: tuple[str, ...] = ()
    extra: Mapping[str, AttributeValue] = field(default_factory=dict)
    # For partitions that exist as devices of their own (static MIG, AMD CPX mode): their profile,
    # their parent's UUID, and the name suffix that keeps devices of one PCI function apart.
    partition_profile: str | None = None
    parent_uuid: str | None = None
    name_suffix: str = ""
    # Partitions the hardware offers but that do not exist yet (MIG profiles with MIG mode off):
    # shown by `unidra inspect`, never published, because no backend can create them at prepare yet.
    offered_profiles: tuple[OfferedProfile, ...] = ()

    @property
    def name(self) -> str:
        """The device's name in the pool: stable across restarts and reboots (see docs/attributes.md)."""
        base = stable_device_name(self.type, self.pci_bus_id, self.uuid)
        return f"{base}-{self.name_suffix}" if self.name_suffix else base


class HealthStatus(enum.StrEnum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"
    UNKNOWN = "Unknown"


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """Something a vendor's health signal said about one device (or, with device "", all of them).

    `kind` is vendor-neutral (see driver/health.py for the policy per kind); `code` keeps the
    vendor's own detail, such as the Xid number.
    """

    device: str
    kind: str
    code: str = ""
    message: str = ""
    healthy: bool = False


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """Device memory one process uses, where the vendor reports it per process (host PID)."""

    pid: int
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """One reading of a device's metrics; None where the device cannot tell."""

    device: str
    utilization: float | None = None
    memory_used_bytes: int | None = None
    memory_limit_bytes: int | None = None
    power_watts: float | None = None
    energy_joules: float | None = None
    temperature_celsius: float | None = None
    errors_corrected: int | None = None
    errors_uncorrected: int | None = None
    processes: tuple[ProcessUsage, ...] = ()


@dataclass(frozen=True, slots=True)
class Partition:
    """A slice of a device (NVIDIA MIG instance, AMD compute partition) the scheduler can allocate.

    It consumes counters from its parent's counter set, so a parent and its partitions (or two
    overlapping partitions) are never allocated together.
    """

    parent: Device
    suffix: str
    profile: str
    placement: int
    memory_bytes: int
    compute_units: int
    consumes: Mapping[str, int]

    @property
    def name(self) -> str:
        return f"{self.parent.name}-{self.suffix}"


@dataclass(frozen=True, slots=True)
class PartitionLayout:
    """How one device can be partitioned: its counters (capacities) and every partition it offers."""

    counters: Mapping[str, int]
    partitions: tuple[Partition, ...]


class Strategy(enum.StrEnum):
    """How the processes of one device's users run side by side (the opaque config's `sharing.strategy`)."""

    EXCLUSIVE = "Exclusive"
    TIME_SLICING = "TimeSlicing"
    MPS = "MPS"


# The limits a sharing mechanism can hold, named after the capacities they cap.
MEMORY = "memory"
COMPUTE_UNITS = "computeUnits"


@dataclass(frozen=True, slots=True)
class SharingSupport:
    """What a backend can do when one device is shared (docs/sharing.md).

    `strategies` are those besides Exclusive, most capable first: the first is what a share runs
    under when its claim does not choose. `limits` says which capacities each strategy really
    holds per share; a strategy missing there holds none. `intervals` are the time-slice lengths
    the device can be set to. `unit_masks` means compute units are given to a share as a set of
    unit indices (a CU mask) rather than as a fraction.
    """

    strategies: tuple[Strategy, ...]
    limits: Mapping[Strategy, frozenset[str]] = field(default_factory=dict)
    intervals: tuple[str, ...] = ()
    unit_masks: bool = False
    memory_step: int = 1 << 30

    def enforces(self, strategy: Strategy, capacity: str) -> bool:
        return capacity in self.limits.get(strategy, frozenset())

    @property
    def compute_shares(self) -> bool:
        """Whether some strategy can cap a share's compute units (else none are handed out)."""
        return any(COMPUTE_UNITS in limits for limits in self.limits.values())


# Devices whose users can only take turns: shares are scheduling bookkeeping, nothing is held.
TIME_SLICING_ONLY = SharingSupport(strategies=(Strategy.TIME_SLICING,))


@dataclass(frozen=True, slots=True)
class Sharing:
    """How one allocation of a device runs next to others: its strategy and the limits to apply.

    Zero means no limit. `units` are the compute-unit indices given to the allocation on devices
    whose compute is shared by masks.
    """

    strategy: Strategy
    interval: str = ""
    memory_bytes: int = 0
    compute_units: int = 0
    units: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceSharing:
    """The state a shared device must be in for every allocation prepared on it."""

    strategy: Strategy
    interval: str = ""


_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def stable_device_name(device_type: DeviceType, pci_bus_id: str | None, uuid: str) -> str:
    """Name a device by its PCI address (`gpu-0000-1b-00-0`), else by a digest of its UUID.

    Enumeration order and driver indices change across reboots and driver reloads; the PCI
    address of a slot does not, and it stays readable for operators.
    """
    if pci_bus_id is not None:
        if not _BDF.match(pci_bus_id):
            raise ValueError(f"PCI bus id {pci_bus_id!r} is not in kernel form dddd:bb:dd.f")
        return f"{device_type}-{pci_bus_id.replace(':', '-').replace('.', '-')}"
    digest = hashlib.sha256(uuid.encode()).hexdigest()[:12]
    return f"{device_type}-{digest}"


def name_token(text: str) -> str:
    """Vendor text (a MIG profile such as `1g.18gb+me`) as it may stand in a device name, a
    DNS label: lower-case letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """A device node to create in the container (CDI `deviceNodes` entry)."""

    path: str
    host_path: str | None = None
    type: str = "c"
    major: int | None = None
    minor: int | None = None
    permissions: str | None = None


@dataclass(frozen=True, slots=True)
class Mount:
    """A bind mount into the container (CDI `mounts` entry)."""

    host_path: str
    container_path: str
    options: tuple[str, ...] = ("ro", "nosuid", "nodev", "bind")
    type: str | None = None


@dataclass(frozen=True, slots=True)
class Hook:
    """An OCI hook the runtime runs (CDI `hooks` entry)."""

    hook_name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True, slots=True)
class ContainerEdits:
    """What a container needs to use a device; the core writes these into CDI specs."""

    env: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    hooks: tuple[Hook, ...] = ()

    def merged(self, others: Iterable[ContainerEdits]) -> ContainerEdits:
        """Concatenate edits, keeping the first of duplicates and the first value of each env name."""
        parts = [self, *others]
        env: dict[str, str] = {}
        for part in parts:
            for item in part.env:
                env.setdefault(item.split("=", 1)[0], item)
        return ContainerEdits(
            env=tuple(env.values()),
            device_nodes=_unique(node for part in parts for node in part.device_nodes),
            mounts=_unique(mount for part in parts for mount in part.mounts),
            hooks=_unique(hook for part in parts for hook in part.hooks),
        )

    def __bool__(self) -> bool:
        return bool(self.env or self.device_nodes or self.mounts or self.hooks)


def _unique(items: Iterable[_H]) -> tuple[_H, ...]:
    return tuple(dict.fromkeys(items))
