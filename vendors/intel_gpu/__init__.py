"""Intel data-centre and Arc GPUs from sysfs (i915 or xe kernel drivers), as Intel's DRA driver reads them.

sysfs says little about capacity, so model facts (Xe cores, memory when the driver does not
expose it) come from a table keyed by PCI device id. sysfs has no hardware UUID either: the
published `uuid` is derived from the node name and PCI address, so it is stable but synthetic.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from driver import pci
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from driver.model import (
    TIME_SLICING_ONLY,
    ContainerEdits,
    Device,
    DeviceSample,
    DeviceType,
    HealthEvent,
    Mount,
    Sharing,
    SharingSupport,
)
from driver.pci import PciFunction, PciMatch
from vendors.host import Host

_NAMESPACE = uuid.UUID("0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d")
GIB = 1 << 30
DRIVERS = ("i915", "xe")
POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Model:
    name: str
    family: str  # xe-hpc, xe-hpg, xe2-hpg
    target: str
    xe_cores: int
    memory: int


MODELS = {
    0x0BD5: Model("Intel Data Center GPU Max 1550", "xe-hpc", "pvc", 128, 128 * GIB),
    0x0BD6: Model("Intel Data Center GPU Max 1550", "xe-hpc", "pvc", 128, 128 * GIB),
    0x0BDA: Model("Intel Data Center GPU Max 1100", "xe-hpc", "pvc", 56, 48 * GIB),
    0x56C0: Model("Intel Data Center GPU Flex 170", "xe-hpg", "dg2", 32, 16 * GIB),
    0x56C1: Model("Intel Data Center GPU Flex 140", "xe-hpg", "dg2", 8, 6 * GIB),
    0x56A0: Model("Intel Arc A770", "xe-hpg", "dg2", 32, 16 * GIB),
    0x56A1: Model("Intel Arc A750", "xe-hpg", "dg2", 28, 8 * GIB),
    0xE20B: Model("Intel Arc B580", "xe2-hpg", "bmg", 20, 12 * GIB),
    0xE211: Model("Intel Arc Pro B60", "xe2-hpg", "bmg", 20, 24 * GIB),
}
_PRECISIONS = {
    "xe-hpc": frozenset({"fp64", "fp32", "tf32", "bf16", "fp16", "int8"}),
    "xe-hpg": frozenset({"fp32", "bf16", "fp16", "int8", "int4"}),
    "xe2-hpg": frozenset({"fp32", "tf32", "bf16", "fp16", "int8", "int4"}),
}


class IntelGpuBackend:
    name = "intel-gpu"
    pci_matches = (PciMatch(0x8086, classes=(0x0300, 0x0380)),)

    def __init__(self, context: BackendContext) -> None:
        self.host = Host(context.host_root)
        self.node_name = context.node_name
        self.poll_seconds = float(context.options.get("poll-seconds", POLL_SECONDS))
        if not any(self.host.path(f"/sys/module/{driver}").exists() for driver in DRIVERS):
            raise BackendUnavailable(
                "neither the i915 nor the xe kernel driver is loaded (no /sys/module/i915 or /sys/module/xe)"
            )
        self._functions: dict[str, tuple[PciFunction, int, int]] = {}

    def discover(self) -> Sequence[Device]:
        devices: list[Device] = []
        functions: dict[str, tuple[PciFunction, int, int]] = {}
        for function in pci.select(pci.scan(self.host.root), self.pci_matches):
            if function.driver not in DRIVERS or (function.sysfs / "physfn").exists():
                continue  # unbound, bound to vfio, or an SR-IOV virtual function
            card, render = _drm_minors(function)
            if card is None or render is None:
                continue
            model = MODELS.get(
                function.device, Model(f"Intel GPU 0x{function.device:04x}", "xe", "unknown", 0, 0)
            )
            device = Device(
                backend=self.name,
                vendor="intel",
                type=DeviceType.GPU,
                model=model.name,
                architecture=model.family,
                uuid=str(
                    uuid.uuid5(_NAMESPACE, f"{self.node_name}/{function.bdf}/{function.device:04x}")
                ),
                index=len(devices),
                # The driver's VRAM size, else the model table's; unknown models publish neither.
                memory_bytes=self._memory(function, card) or model.memory or None,
                compute_units=model.xe_cores or None,
                pci_bus_id=function.bdf,
                pcie_root=function.pcie_root,
                numa_node=function.numa_node,
                driver_version=self.host.read(f"/sys/module/{function.driver}/version")
                or self.host.read("/proc/sys/kernel/osrelease"),
                compute_target=model.target,
                precisions=_PRECISIONS.get(model.family, frozenset({"fp32", "fp16"})),
                extra={"gpu.intel.com/driver": function.driver or ""},
            )
            devices.append(device)
            functions[device.name] = (function, card, render)
        self._functions = functions
        return devices

    def device_edits(self, device: Device) -> ContainerEdits:
        function, card, render = self._function(device)
        nodes = self.host.drm_nodes(card, render)
        if nodes is None:
            raise BackendUnavailable(
                f"{device.name}: cannot find the numbers of card{card}/renderD{render}"
            )
        # Level Zero and media stacks look GPUs up through /dev/dri/by-path. A link left dangling
        # (udev lagging behind a driver rebind) is not mounted: its missing source would fail
        # the container's start.
        mounts = tuple(
            Mount(path, path, options=("bind",))
            for path in (
                f"/dev/dri/by-path/pci-{function.bdf}-card",
                f"/dev/dri/by-path/pci-{function.bdf}-render",
            )
            if self.host.resolve(path) is not None
        )
        return ContainerEdits(device_nodes=nodes, mounts=mounts)

    def shared_edits(self, devices: Sequence[Device]) -> ContainerEdits:
        return ContainerEdits()

    def sharing_support(self, device: Device) -> SharingSupport | None:
        """Processes take turns on the GPU (the GuC schedules their contexts); Level Zero has
        no per-process memory or compute cap, so a share holds nothing."""
        return TIME_SLICING_ONLY

    def sharing_edits(self, device: Device, sharing: Sharing) -> ContainerEdits:
        return ContainerEdits()

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        """A GPU whose driver lets go of it (unbind after a fatal error, hot removal) is lost."""
        while not stop.wait(self.poll_seconds):
            for name, (function, _, _) in list(self._functions.items()):
                current = pci.read(self.host.root, function.bdf)
                if current is None or current.driver not in DRIVERS:
                    yield HealthEvent(name, "lost", message="the GPU is no longer bound to i915/xe")

    def sample(self) -> Sequence[DeviceSample]:
        samples = []
        for name, (function, _, _) in self._functions.items():
            hwmon = next(iter(sorted(function.sysfs.glob("hwmon/hwmon*"))), None)
            energy = self.host.number(hwmon / "energy1_input") if hwmon else None
            temperature = self.host.number(hwmon / "temp2_input") if hwmon else None
            samples.append(
                DeviceSample(
                    device=name,
                    energy_joules=energy / 1e6 if energy is not None else None,
                    temperature_celsius=temperature / 1000 if temperature is not None else None,
                )
            )
        return samples

    def _function(self, device: Device) -> tuple[PciFunction, int, int]:
        entry = self._functions.get(device.name)
        if entry is None:
            raise BackendUnavailable(f"{device.name} is no longer present")
        return entry

    def _memory(self, function: PciFunction, card: int) -> int:
        for candidate in (
            function.sysfs / "tile0" / "physical_vram_size_bytes",  # xe
            self.host.path(f"/sys/class/drm/card{card}/lmem_total_bytes"),  # i915 out-of-tree
        ):
            value = self.host.read(candidate)
            if value and value.isdigit():
                return int(value)
        return 0


def _drm_minors(function: PciFunction) -> tuple[int | None, int | None]:
    drm = function.sysfs / "drm"
    if not drm.is_dir():
        return None, None
    cards = sorted(int(p.name[4:]) for p in drm.glob("card*") if p.name[4:].isdigit())
    renders = sorted(int(p.name[7:]) for p in drm.glob("renderD*") if p.name[7:].isdigit())
    return (cards[0] if cards else None), (renders[0] if renders else None)
