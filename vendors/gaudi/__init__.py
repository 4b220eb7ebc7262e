"""Intel Gaudi accelerators (HPUs) from sysfs of the habanalabs kernel driver.

Devices are /dev/accel/accel<N> with their control node; a claim's containers also get
HABANA_VISIBLE_DEVICES / HABANA_VISIBLE_MODULES for its devices, the scale-out uverbs nodes,
and the vendor's createRuntime hook and gaudinet.json when the host has them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from driver import pci
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from driver.model import (
    ContainerEdits,
    Device,
    DeviceSample,
    DeviceType,
    HealthEvent,
    Hook,
    Interconnect,
    Mount,
)
from driver.pci import PciFunction, PciMatch
from vendors.host import Host

GIB = 1 << 30
HOOK = "/usr/bin/habana-container-hook"
GAUDINET = "/etc/habanalabs/gaudinet.json"
POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Model:
    name: str
    architecture: str
    tpcs: int
    memory: int
    precisions: frozenset[str]


_GAUDI2 = Model(
    "Intel Gaudi 2",
    "gaudi2",
    24,
    96 * GIB,
    frozenset({"fp32", "tf32", "bf16", "fp16", "fp8", "int8"}),
)
_GAUDI3 = Model(
    "Intel Gaudi 3", "gaudi3", 64, 128 * GIB, frozenset({"fp32", "tf32", "bf16", "fp16", "fp8"})
)
MODELS = {
    0x1000: Model("Intel Gaudi", "gaudi", 8, 32 * GIB, frozenset({"fp32", "bf16", "int8"})),
    0x1001: Model("Intel Gaudi", "gaudi", 8, 32 * GIB, frozenset({"fp32", "bf16", "int8"})),
    0x1020: _GAUDI2,
    0x1030: _GAUDI3,
    0x1060: _GAUDI3,
    0x1061: _GAUDI3,
    0x1062: _GAUDI3,
    0x1063: _GAUDI3,
}


@dataclass(frozen=True)
class _Hpu:
    function: PciFunction
    accel: int
    module: int | None
    uverbs: int | None


class GaudiBackend:
    name = "gaudi"
    pci_matches = (PciMatch(0x1DA3),)

    def __init__(self, context: BackendContext) -> None:
        self.host = Host(context.host_root)
        self.poll_seconds = float(context.options.get("poll-seconds", POLL_SECONDS))
        if not self.host.path("/sys/module/habanalabs").exists():
            raise BackendUnavailable(
                "the habanalabs kernel driver is not loaded (no /sys/module/habanalabs)"
            )
        self._hpus: dict[str, _Hpu] = {}

    def discover(self) -> Sequence[Device]:
        found = []
        for function in pci.select(pci.scan(self.host.root), self.pci_matches):
            if function.driver != "habanalabs":
                continue
            accels = sorted(int(p.name[5:]) for p in (function.sysfs / "accel").glob("accel[0-9]*"))
            if not accels:
                continue
            module = self.host.read(function.sysfs / "module_id")
            uverbs = sorted(
                int(p.name[6:]) for p in (function.sysfs / "infiniband_verbs").glob("uverbs*")
            )
            found.append(
                _Hpu(
                    function,
                    accels[0],
                    int(module) if module and module.isdigit() else None,
                    uverbs[0] if uverbs else None,
                )
            )
        serials = {
            hpu.function.bdf: self.host.read(hpu.function.sysfs / "serial_number")
            or hpu.function.bdf
            for hpu in found
        }
        # OAM modules on one baseboard are wired all-to-all over their on-die RoCE ports; PCIe cards are not.
        on_board = [hpu for hpu in found if hpu.module is not None]
        domain = (
            "gaudi-"
            + hashlib.sha256(
                ",".join(sorted(serials[h.function.bdf] for h in on_board)).encode()
            ).hexdigest()[:16]
        )
        devices, hpus = [], {}
        for hpu in found:
            model = MODELS.get(
                hpu.function.device,
                Model(f"Intel Gaudi 0x{hpu.function.device:04x}", "gaudi", 0, 0, frozenset()),
            )
            meshed = hpu.module is not None and len(on_board) > 1
            device = Device(
                backend=self.name,
                vendor="intel",
                type=DeviceType.HPU,
                model=model.name,
                architecture=model.architecture,
                uuid=serials[hpu.function.bdf],
                index=hpu.accel,
                memory_bytes=model.memory or None,  # unknown models publish no capacity
                compute_units=model.tpcs or None,
                pci_bus_id=hpu.function.bdf,
                pcie_root=hpu.function.pcie_root,
                numa_node=hpu.function.numa_node,
                driver_version=self.host.read("/sys/module/habanalabs/version"),
                firmware_version=self.host.read(hpu.function.sysfs / "fw_os_ver")
                or self.host.read(hpu.function.sysfs / "armcp_ver"),
                precisions=model.precisions,
                interconnect=Interconnect("roce", domain) if meshed else None,
                peers=tuple(serials[h.function.bdf] for h in on_board if h is not hpu)
                if meshed
                else (),
            )
            devices.append(device)
            hpus[device.name] = hpu
        self._hpus = hpus
        return devices

    def device_edits(self, device: Device) -> ContainerEdits:
        hpu = self._hpu(device)
        nodes = [
            self.host.device_node(
                f"/dev/accel/accel{hpu.accel}", sysfs_dev=f"/sys/class/accel/accel{hpu.accel}/dev"
            ),
            self.host.device_node(
                f"/dev/accel/accel_controlD{hpu.accel}",
                sysfs_dev=f"/sys/class/accel/accel_controlD{hpu.accel}/dev",
            ),
        ]
        if hpu.uverbs is not None:
            nodes.append(
                self.host.device_node(
                    f"/dev/infiniband/uverbs{hpu.uverbs}",
                    sysfs_dev=f"/sys/class/infiniband_verbs/uverbs{hpu.uverbs}/dev",
                )
            )
        if nodes[0] is None or nodes[1] is None:
            raise BackendUnavailable(f"{device.name}: cannot find the numbers of accel{hpu.accel}")
        return ContainerEdits(device_nodes=tuple(n for n in nodes if n is not None))

    def shared_edits(self, devices: Sequence[Device]) -> ContainerEdits:
        hpus = [self._hpu(d) for d in devices]
        env = [
            "HABANA_VISIBLE_DEVICES=" + ",".join(str(h.accel) for h in hpus),
            "HL_VISIBLE_DEVICES=" + ",".join(f"/dev/accel/accel{h.accel}" for h in hpus),
        ]
        if all(h.module is not None for h in hpus):
            env.append("HABANA_VISIBLE_MODULES=" + ",".join(str(h.module) for h in hpus))
        hooks = (
            (Hook("createRuntime", HOOK, ("habana-container-hook", "createRuntime")),)
            if self.host.path(HOOK).is_file()
            else ()
        )
        mounts = (Mount(GAUDINET, GAUDINET),) if self.host.path(GAUDINET).is_file() else ()
        return ContainerEdits(env=tuple(env), hooks=hooks, mounts=mounts)

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        """The driver's device status: anything but "Operational" is unhealthy, and recovery is reported."""
        last: dict[str, str] = {}
        while True:
            for name, hpu in list(self._hpus.items()):
                status = self.host.read(hpu.function.sysfs / "status") or "unknown"
                if last.get(name, "Operational") != status:
                    healthy = status == "Operational"
                    yield HealthEvent(
                        name,
                        "device-status",
                        status,
                        f"habanalabs status: {status}",
                        healthy=healthy,
                    )
                last[name] = status
            if stop.wait(self.poll_seconds):
                return

    def sample(self) -> Sequence[DeviceSample]:
        samples = []
        for name, hpu in self._hpus.items():
            hwmon = next(iter(sorted(hpu.function.sysfs.glob("hwmon/hwmon*"))), None)
            power = self.host.number(hwmon / "power1_input") if hwmon else None
            temperature = self.host.number(hwmon / "temp1_input") if hwmon else None
            samples.append(
                DeviceSample(
                    device=name,
                    power_watts=power / 1e6 if power is not None else None,
                    temperature_celsius=temperature / 1000 if temperature is not None else None,
                    memory_limit_bytes=MODELS[hpu.function.device].memory
                    if hpu.function.device in MODELS
                    else None,
                )
            )
        return samples

    def _hpu(self, device: Device) -> _Hpu:
        hpu = self._hpus.get(device.name)
        if hpu is None:
            raise BackendUnavailable(f"{device.name} is no longer present")
        return hpu
