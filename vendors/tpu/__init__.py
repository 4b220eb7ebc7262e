"""Google TPUs from sysfs and /dev: /dev/accel<N> for v4 and older, VFIO groups for v5 and newer.

The host shows chip count and generation only; chips of one host are one ICI slice. There is no
hardware UUID, so `uuid` is derived from the node name and PCI address (stable, synthetic).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from driver import pci
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from driver.model import ContainerEdits, Device, DeviceType, Interconnect
from driver.pci import PciFunction, PciMatch
from vendors.host import Host

GIB = 1 << 30
_NAMESPACE = uuid.UUID("5c9d4b1a-7e2f-4d3c-9a8b-1f2e3d4c5b6a")


@dataclass(frozen=True)
class Generation:
    name: str
    memory: int
    tensor_cores: int
    precisions: frozenset[str]


GENERATIONS = {
    0x005E: Generation("v4", 32 * GIB, 2, frozenset({"fp32", "bf16", "int8"})),
    0x0062: Generation("v5p", 95 * GIB, 2, frozenset({"fp32", "bf16", "fp8", "int8"})),
    0x0063: Generation("v5e", 16 * GIB, 1, frozenset({"fp32", "bf16", "int8", "int4"})),
    0x006F: Generation("v6e", 32 * GIB, 1, frozenset({"fp32", "bf16", "fp8", "int8", "int4"})),
    0x0076: Generation("tpu7x", 192 * GIB, 2, frozenset({"fp32", "bf16", "fp8", "int8"})),
}


@dataclass(frozen=True)
class _Chip:
    function: PciFunction
    accel: int | None
    group: int | None


class TpuBackend:
    name = "tpu"
    pci_matches = (PciMatch(0x1AE0, devices=tuple(GENERATIONS)),)

    def __init__(self, context: BackendContext) -> None:
        self.host = Host(context.host_root)
        self.node_name = context.node_name
        self._chips: dict[str, _Chip] = {}

    def discover(self) -> Sequence[Device]:
        chips = []
        for function in pci.select(pci.scan(self.host.root), self.pci_matches):
            accels = sorted(int(p.name[5:]) for p in (function.sysfs / "accel").glob("accel[0-9]*"))
            group = _iommu_group(function)
            if accels:
                chips.append(_Chip(function, accels[0], None))
            elif function.driver == "vfio-pci" and group is not None:
                chips.append(_Chip(function, None, group))
        if not chips and pci.select(pci.scan(self.host.root), self.pci_matches):
            raise BackendUnavailable(
                "TPU chips found, but neither /dev/accel nor vfio-pci serves them: check the TPU driver"
            )
        domain = f"ici-{self.node_name or 'node'}"
        names = [str(uuid.uuid5(_NAMESPACE, f"{self.node_name}/{c.function.bdf}")) for c in chips]
        devices, by_name = [], {}
        for index, (chip, chip_uuid) in enumerate(zip(chips, names, strict=True)):
            generation = GENERATIONS[chip.function.device]
            device = Device(
                backend=self.name,
                vendor="google",
                type=DeviceType.TPU,
                model=f"TPU {generation.name}",
                architecture=generation.name,
                uuid=chip_uuid,
                index=index,
                memory_bytes=generation.memory,
                compute_units=generation.tensor_cores,
                pci_bus_id=chip.function.bdf,
                pcie_root=chip.function.pcie_root,
                numa_node=chip.function.numa_node,
                precisions=generation.precisions,
                interconnect=Interconnect("ici", domain) if len(chips) > 1 else None,
                peers=tuple(n for n in names if n != chip_uuid) if len(chips) > 1 else (),
            )
            devices.append(device)
            by_name[device.name] = chip
        self._chips = by_name
        return devices

    def device_edits(self, device: Device) -> ContainerEdits:
        chip = self._chips.get(device.name)
        if chip is None:
            raise BackendUnavailable(f"{device.name} is no longer present")
        if chip.accel is not None:
            node = self.host.device_node(
                f"/dev/accel{chip.accel}", sysfs_dev=f"/sys/class/accel/accel{chip.accel}/dev"
            )
        else:
            node = self.host.device_node(
                f"/dev/vfio/{chip.group}", sysfs_dev=f"/sys/class/vfio/{chip.group}/dev"
            )
        if node is None:
            raise BackendUnavailable(f"{device.name}: cannot find its device node")
        return ContainerEdits(device_nodes=(node,))

    def shared_edits(self, devices: Sequence[Device]) -> ContainerEdits:
        chips = [self._chips[d.name] for d in devices if d.name in self._chips]
        nodes = []
        if any(c.group is not None for c in chips):
            vfio = self.host.device_node("/dev/vfio/vfio", sysfs_dev="/sys/class/misc/vfio/dev")
            if vfio is not None:
                nodes.append(vfio)
        # A claim may hold a subset of the host's chips; libtpu must see exactly those.
        bounds = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}.get(len(chips))
        env = ["TPU_VISIBLE_CHIPS=" + ",".join(str(d.index) for d in devices)]
        if bounds and len(chips) < len(self._chips):
            env += [f"TPU_CHIPS_PER_HOST_BOUNDS={bounds}", "TPU_HOST_BOUNDS=1,1,1"]
        return ContainerEdits(env=tuple(env), device_nodes=tuple(nodes))


def _iommu_group(function: PciFunction) -> int | None:
    try:
        return int(os.path.basename(os.readlink(function.sysfs / "iommu_group")))
    except (OSError, ValueError):
        return None
