"""Rebellions NPUs (ATOM, ATOM+, ATOM-Max, REBEL) from `rbln-smi -j`, as Rebellions' own DRA driver reads them.

Some ATOM cards report an all-zero UUID; they are still named by PCI address, and publish no
uuid attribute rather than a meaningless one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from driver import pci
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from driver.model import ContainerEdits, Device, DeviceSample, DeviceType, HealthEvent, Interconnect
from driver.pci import PciMatch
from vendors.host import Host

GIB = 1 << 30
# Where Rebellions' DRA driver looks for the CLI, in order.
CLI = ("/usr/bin/rbln-smi", "/run/rbln/driver/usr/bin/rbln-smi", "/usr/local/bin/rbln-smi")
TIMEOUT = 5.0
POLL_SECONDS = 10.0
ZERO_UUID = "00000000-0000-0000-0000-000000000000"
HEALTHY_STATUS = ("normal", "ok", "idle", "running")


@dataclass(frozen=True)
class Model:
    name: str
    architecture: str
    engines: int
    precisions: frozenset[str]


_ATOM = frozenset({"fp16", "bf16", "int8", "int4"})
MODELS = {
    "RBLN-CA02": Model("Rebellions ATOM", "atom", 8, _ATOM),
    "RBLN-CA12": Model("Rebellions ATOM+", "atom", 8, _ATOM),
    "RBLN-CA22": Model("Rebellions ATOM+", "atom", 8, _ATOM),
    "RBLN-CA25": Model("Rebellions ATOM-Max", "atom", 8, _ATOM),
    "RBLN-CR03": Model(
        "Rebellions REBEL", "rebel", 16, frozenset({"fp16", "bf16", "fp8", "int8", "int4"})
    ),
}


class RebellionsBackend:
    name = "rebellions"
    pci_matches = (PciMatch(0x1EFF),)

    def __init__(self, context: BackendContext) -> None:
        self.host = Host(context.host_root)
        self.poll_seconds = float(context.options.get("poll-seconds", POLL_SECONDS))
        self._npus: dict[str, dict[str, Any]] = {}

    def read(self) -> dict[str, Any]:
        """`rbln-smi -j`, parsed; BackendUnavailable with the CLI's own words when it fails."""
        output = self.host.run(CLI, ["-j"], TIMEOUT, "rbln-smi")
        try:
            document: dict[str, Any] = json.loads(output)
        except ValueError as err:
            raise BackendUnavailable(f"rbln-smi -j did not print JSON: {err}") from err
        return document

    def discover(self) -> Sequence[Device]:
        document = self.read()
        entries = sorted(document.get("devices") or [], key=lambda d: int(d.get("npu", 0)))
        groups: dict[str, list[str]] = {}
        for entry in entries:
            groups.setdefault(str(entry.get("group_id", "0")), []).append(
                self._uuid(entry) or entry["pci"]["bus_id"]
            )
        devices, npus = [], {}
        for entry in entries:
            model = MODELS.get(
                entry.get("name", ""),
                Model(str(entry.get("name", "Rebellions NPU")), "atom", 0, _ATOM),
            )
            bdf = pci.normalize_bdf(entry["pci"]["bus_id"])
            members = groups[str(entry.get("group_id", "0"))]
            identity = self._uuid(entry) or entry["pci"]["bus_id"]
            device = Device(
                backend=self.name,
                vendor="rebellions",
                type=DeviceType.NPU,
                model=model.name,
                architecture=model.architecture,
                uuid=self._uuid(entry),
                index=int(entry.get("npu", 0)),
                memory_bytes=int(entry.get("memory", {}).get("total", 0)),
                compute_units=model.engines,
                pci_bus_id=bdf,
                pcie_root=pci.pcie_root(self.host.root, bdf),
                numa_node=pci.parse_numa(entry["pci"].get("numa_node")),
                driver_version=document.get("KMD_version"),
                firmware_version=entry.get("fw_ver"),
                precisions=model.precisions,
                # NPUs of one RSD group can form a tensor-parallel group over PCIe peer-to-peer.
                interconnect=Interconnect("rsd", f"rsd-{entry.get('group_id', '0')}")
                if len(members) > 1
                else None,
                peers=tuple(m for m in members if m != identity) if len(members) > 1 else (),
                extra={"npu.rebellions.ai/productName": str(entry.get("name", ""))[:64]},
            )
            devices.append(device)
            npus[device.name] = entry
        self._npus = npus
        return devices

    def device_edits(self, device: Device) -> ContainerEdits:
        entry = self._npus.get(device.name)
        if entry is None:
            raise BackendUnavailable(f"{device.name} is no longer present")
        name = entry.get("device") or f"rbln{entry.get('npu', 0)}"
        node = self.host.device_node(
            f"/dev/{name}", major_name="rbln", minor=int(entry.get("npu", 0))
        )
        if node is None:
            raise BackendUnavailable(
                f"{device.name}: /dev/{name} not found and no rbln major in /proc/devices"
            )
        return ContainerEdits(device_nodes=(node,))

    def shared_edits(self, devices: Sequence[Device]) -> ContainerEdits:
        return ContainerEdits()

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        """The status rbln-smi reports per NPU; NPUs that vanish from its list are lost."""
        last: dict[str, str] = {}
        while True:
            try:
                current = {
                    pci.normalize_bdf(d["pci"]["bus_id"]): d
                    for d in self.read().get("devices") or []
                }
            except BackendUnavailable as err:
                current = {}
                if not last:
                    raise BackendUnavailable(f"cannot watch NPU health: {err}") from err
            for name, entry in list(self._npus.items()):
                now = current.get(pci.normalize_bdf(entry["pci"]["bus_id"]))
                status = str(now.get("status", "unknown")) if now else "missing"
                if last.get(name, "normal") != status:
                    healthy = status.lower() in HEALTHY_STATUS
                    kind = "lost" if now is None or last.get(name) == "missing" else "device-status"
                    yield HealthEvent(
                        name, kind, status, f"rbln-smi status: {status}", healthy=healthy
                    )
                last[name] = status
            if stop.wait(self.poll_seconds):
                return

    def sample(self) -> Sequence[DeviceSample]:
        current = {
            pci.normalize_bdf(d["pci"]["bus_id"]): d for d in self.read().get("devices") or []
        }
        samples = []
        for name, entry in self._npus.items():
            now = current.get(pci.normalize_bdf(entry["pci"]["bus_id"]), {})
            memory = now.get("memory", {})
            samples.append(
                DeviceSample(
                    device=name,
                    utilization=_number(now.get("util"), 1 / 100),
                    memory_used_bytes=_integer(memory.get("used")),
                    memory_limit_bytes=_integer(memory.get("total")),
                    temperature_celsius=_number(now.get("temperature")),
                    power_watts=_number(now.get("power")),
                )
            )
        return samples

    @staticmethod
    def _uuid(entry: dict[str, Any]) -> str:
        value = str(entry.get("uuid") or "")
        return "" if value in ("", ZERO_UUID) else value


def _integer(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _number(value: Any, scale: float = 1.0) -> float | None:
    try:
        return float(str(value).rstrip("%CW ")) * scale
    except (TypeError, ValueError):
        return None
