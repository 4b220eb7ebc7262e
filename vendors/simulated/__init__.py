"""The simulated backend: realistic devices from node profiles, for demos, tests and benchmarks.

Devices carry the attributes and CDI edits of the real vendor (device node names, majors and
minors, env, mounts). With the `dev-root` option, CDI device nodes and mounts point at that fake
/dev tree; like the real backends, a mount is only added if its host path is there. Faults
can be injected at run time (`unidra simulate inject`), and metrics are synthetic but plausible.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from driver.backends import BackendContext
from driver.errors import BackendUnavailable, ConfigError
from driver.model import (
    TIME_SLICING_ONLY,
    ContainerEdits,
    Device,
    DeviceNode,
    DeviceSample,
    DeviceType,
    HealthEvent,
    Interconnect,
    Mount,
    Partition,
    PartitionLayout,
    Sharing,
    SharingSupport,
    name_token,
)
from vendors.amd import sharing as amd_sharing
from vendors.nvidia.capabilities import xid_event
from vendors.simulated import profiles
from vendors.simulated.profiles import ModelSpec, NodeTemplate, Placement

# Faults `unidra simulate inject --fault` accepts, besides xid-<number>.
FAULTS = {
    "ecc-dbe": ("ecc-uncorrectable", "dbe", "double-bit ECC error (injected)"),
    "lost": ("lost", "", "device lost (injected)"),
    "overheat": ("overheating", "thermal", "temperature above the slowdown threshold (injected)"),
}
# A fixed namespace so the same node and profile always yield the same device UUIDs.
_UUID_NAMESPACE = uuid.UUID("6f2c1a4e-93d1-4c55-9a7e-2b7f0e4d5c10")


@dataclass(frozen=True)
class _Simulated:
    """A discovered device together with what is needed to build its container edits."""

    device: Device
    model: ModelSpec
    index: int
    drm: int


class SimulatedBackend:
    """Backend over a node profile (`--simulate PROFILE|FILE`)."""

    name = "simulated"

    def __init__(self, context: BackendContext) -> None:
        profile_ref = context.options.get("profile")
        if not profile_ref:
            raise BackendUnavailable(
                "the simulated backend needs a profile: pass --simulate with one of "
                + ", ".join(profiles.builtin_names())
            )
        self.profile_ref = profile_ref
        self.profile = profiles.load(profile_ref)
        self._profile_mtime = self._mtime()
        self.node_name = context.node_name
        dev_root = context.options.get("dev-root")
        self.dev_root = dev_root.rstrip("/") if dev_root else None
        self._devices = self._build()
        self._events: queue.Queue[HealthEvent] = queue.Queue()
        self._faulty: set[str] = set()
        self._started = time.monotonic()

    def discover(self) -> Sequence[Device]:
        # Editing a profile file is how one simulates hot-plug: the next discovery sees it.
        mtime = self._mtime()
        if mtime != self._profile_mtime:
            self.profile = profiles.load(self.profile_ref)
            self._profile_mtime = mtime
            self._devices = self._build()
        return [entry.device for entry in self._devices.values()]

    def partition_layout(self, device: Device) -> PartitionLayout | None:
        spec = self._entry(device).model.partitions
        if spec is None:
            return None
        slots = {f"{spec.slot_counter}-{i}": 1 for i in range(spec.slots)}
        model = self._entry(device).model
        counters = {"memory": model.memory, "compute-units": model.compute_units}
        counters.update(dict(spec.counters))
        counters.update(slots)
        partitions = []
        for profile in spec.profiles:
            token = name_token(profile.profile)
            for start in profile.placements:
                consumes = {"memory": profile.memory, "compute-units": profile.compute_units}
                consumes.update(dict(profile.consumes))
                consumes.update(
                    {f"{spec.slot_counter}-{i}": 1 for i in range(start, start + profile.size)}
                )
                name = spec.prefix if token == spec.prefix else f"{spec.prefix}-{token}"
                partitions.append(
                    Partition(
                        parent=device,
                        suffix=f"{name}-{start}",
                        profile=profile.profile,
                        placement=start,
                        memory_bytes=profile.memory,
                        compute_units=profile.compute_units,
                        consumes=consumes,
                    )
                )
        return PartitionLayout(counters=counters, partitions=tuple(partitions))

    def partition_edits(self, partition: Partition) -> ContainerEdits:
        entry = self._entry(partition.parent)
        spec = entry.model.partitions
        own = tuple(
            self._node(node, entry, partition.placement)
            for node in (spec.device_nodes if spec else ())
        )
        parent = self.device_edits(partition.parent)
        return ContainerEdits(env=parent.env, device_nodes=parent.device_nodes + own)

    def device_edits(self, device: Device) -> ContainerEdits:
        entry = self._entry(device)
        mounts = []
        for template in entry.model.mounts:
            path = self._expand(template, entry)
            host_path = self._host_path(path)
            # A dangling link would fail the container's start: runc binds what the link names.
            if os.path.exists(host_path):
                mounts.append(Mount(host_path, path, options=("bind",)))
        return ContainerEdits(
            env=tuple(self._expand(item, entry) for item in entry.model.env),
            device_nodes=tuple(self._node(node, entry) for node in entry.model.device_nodes),
            mounts=tuple(mounts),
        )

    def shared_edits(self, devices: Sequence[Device]) -> ContainerEdits:
        entries = [self._entry(device) for device in devices]
        models = list(dict.fromkeys(entry.model for entry in entries))
        env = [item for model in models for item in model.shared_env]
        for model in models:
            for name, template in model.claim_env:
                values = [self._expand(template, e) for e in entries if e.model == model]
                env.append(f"{name}={','.join(values)}")
        nodes = [
            self._node(node, entries[0]) for model in models for node in model.shared_device_nodes
        ]
        return ContainerEdits(env=tuple(env), device_nodes=tuple(dict.fromkeys(nodes)))

    def sharing_support(self, device: Device) -> SharingSupport | None:
        """GPUs share as their vendor's stack lets them, minus what needs a daemon: a simulated
        NVIDIA GPU has no MPS, so its shares take turns; AMD's CU masks are plain environment.
        NPUs, TPUs and HPUs are not shared (docs/sharing.md)."""
        if device.type is not DeviceType.GPU:
            return None
        if device.vendor == "amd":
            return amd_sharing.support(device)
        return TIME_SLICING_ONLY

    def sharing_edits(self, device: Device, sharing: Sharing) -> ContainerEdits:
        return amd_sharing.edits(sharing) if device.vendor == "amd" else ContainerEdits()

    def inject(self, device: str, fault: str) -> HealthEvent:
        """Make a device raise a fault: `xid-<number>`, `ecc-dbe`, `lost` or `overheat`."""
        self._known(device)
        if fault.startswith("xid-") and fault[4:].isdigit():
            event = xid_event(int(fault[4:]), device)
        elif fault in FAULTS:
            kind, code, message = FAULTS[fault]
            event = HealthEvent(device, kind, code, message)
        else:
            raise ConfigError(
                "--fault", f"{fault!r} is not one of xid-<number>, {', '.join(FAULTS)}"
            )
        if not event.healthy:
            self._faulty.add(device)
        self._events.put(event)
        return event

    def recover(self, device: str) -> HealthEvent:
        """The device was reset: every fault clears."""
        self._known(device)
        self._faulty.discard(device)
        event = HealthEvent(
            device, "recovered", message="device reset (injected recovery)", healthy=True
        )
        self._events.put(event)
        return event

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        while not stop.is_set():
            try:
                yield self._events.get(timeout=0.2)
            except queue.Empty:
                continue

    def sample(self) -> Sequence[DeviceSample]:
        """Plausible, slowly varying readings; a faulty device reads as idle and hot."""
        elapsed = time.monotonic() - self._started
        samples = []
        for entry in self._devices.values():
            device = entry.device
            phase = elapsed / 60 + entry.index
            busy = 0.0 if device.name in self._faulty else 0.5 + 0.4 * math.sin(phase)
            samples.append(
                DeviceSample(
                    device=device.name,
                    utilization=round(busy, 3),
                    memory_used_bytes=int((device.memory_bytes or 0) * busy * 0.8),
                    memory_limit_bytes=device.memory_bytes,
                    power_watts=round(80 + 500 * busy, 1),
                    energy_joules=round(elapsed * (80 + 250 * busy), 1),
                    temperature_celsius=95.0
                    if device.name in self._faulty
                    else round(35 + 30 * busy, 1),
                    errors_corrected=0,
                    errors_uncorrected=1 if device.name in self._faulty else 0,
                )
            )
        return samples

    def _known(self, device: str) -> None:
        if not any(entry.device.name == device for entry in self._devices.values()):
            names = ", ".join(sorted(e.device.name for e in self._devices.values()))
            raise ConfigError(
                "--device", f"{device!r} is not a simulated device here; devices: {names}"
            )

    def _mtime(self) -> float | None:
        path = Path(self.profile_ref)
        return path.stat().st_mtime if path.is_file() else None

    def _entry(self, device: Device) -> _Simulated:
        try:
            return self._devices[device.uuid]
        except KeyError:
            raise KeyError(
                f"device {device.name} is not from profile {self.profile.name}"
            ) from None

    def _build(self) -> dict[str, _Simulated]:
        vendor_counts: dict[str, int] = {}
        drm_count = 0
        numbered = []
        for placement in self.profile.placements:
            model = placement.model
            index = vendor_counts.get(model.vendor, 0)
            vendor_counts[model.vendor] = index + 1
            seed = f"{self.node_name}/{self.profile.name}/{placement.pci_bus_id}"
            device_uuid = model.uuid_prefix + str(uuid.uuid5(_UUID_NAMESPACE, seed))
            numbered.append((placement, device_uuid, index, drm_count))
            drm_count += model.uses_drm_numbering
        members: dict[str, list[str]] = {}
        for placement, device_uuid, _, _ in numbered:
            if placement.interconnect_domain:
                members.setdefault(placement.interconnect_domain, []).append(device_uuid)
        result = {}
        for placement, device_uuid, index, drm in numbered:
            peers = [
                p for p in members.get(placement.interconnect_domain or "", []) if p != device_uuid
            ]
            device = self._device(placement, device_uuid, index, tuple(peers))
            result[device_uuid] = _Simulated(device, placement.model, index, drm)
        return result

    def _device(
        self, placement: Placement, device_uuid: str, index: int, peers: tuple[str, ...]
    ) -> Device:
        model = placement.model
        interconnect = None
        if model.interconnect and placement.interconnect_domain:
            interconnect = Interconnect(model.interconnect, placement.interconnect_domain)
        return Device(
            backend=self.name,
            vendor=model.vendor,
            type=model.type,
            model=model.model,
            architecture=model.architecture,
            uuid=device_uuid,
            index=index,
            memory_bytes=model.memory,
            compute_units=model.compute_units,
            pci_bus_id=placement.pci_bus_id,
            pcie_root=placement.pcie_root,
            numa_node=placement.numa_node,
            driver_version=model.driver_version,
            firmware_version=model.firmware_version,
            compute_capability=model.compute_capability,
            compute_target=model.compute_target,
            precisions=model.precisions,
            interconnect=interconnect,
            peers=peers,
            extra=dict(model.extra),
        )

    def _expand(self, template: str, entry: _Simulated, start: int = 0) -> str:
        return profiles.expand(
            template, entry.index, entry.drm, start, entry.device.pci_bus_id or ""
        )

    def _host_path(self, path: str) -> str:
        return f"{self.dev_root}{path.removeprefix('/dev')}" if self.dev_root else path

    def _node(self, template: NodeTemplate, entry: _Simulated, start: int = 0) -> DeviceNode:
        path = self._expand(template.path, entry, start)
        return DeviceNode(
            path=path,
            host_path=self._host_path(path) if self.dev_root else None,
            type="c",
            major=template.major,
            minor=int(self._expand(template.minor, entry, start)),
        )
