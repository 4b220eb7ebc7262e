"""Rebellions NPUs (ATOM, ATOM+, ATOM-Max, REBEL) from `rbln-smi -j`, as Rebellions' own DRA driver reads them.

Some ATOM cards report an all-zero UUID; they are still named by PCI address, and publish no
uuid attribute rather than a meaningless one.
"""

from __future__ import annotations

import json
import logging
import re
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

log = logging.getLogger(__name__)
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
        """An NPU needs its PCI address and device node from rbln-smi; every other field is optional."""
        document = self.read()
        entries: list[tuple[str, dict[str, Any]]] = []
        for entry in document.get("devices") or []:
            bdf = _bdf(entry) if isinstance(entry, dict) else None
            if bdf is None or _minor(entry) is None:
                log.warning(
                    "Skipping an NPU rbln-smi does not name", extra={"entry": str(entry)[:200]}
                )
                continue
            entries.append((bdf, entry))
        entries.sort(key=lambda item: (_minor(item[1]) or 0, item[0]))
        groups: dict[str, list[str]] = {}
        for bdf, entry in entries:
            group = _text(entry.get("group_id"))
            if group is not None:
                groups.setdefault(group, []).append(self._uuid(entry) or bdf)
        kmd = _text(document.get("KMD_version"))
        devices, npus = [], {}
        for bdf, entry in entries:
            product = _text(entry.get("name"))
            model = MODELS.get(
                product or "", Model(product or "Rebellions NPU", "unknown", 0, frozenset())
            )
            group = _text(entry.get("group_id"))
            members = groups.get(group, []) if group is not None else []
            identity = self._uuid(entry) or bdf
            numa = pci.parse_numa(_field(entry, "pci", "numa_node"))
            if numa is None:
                numa = pci.numa_of(self.host.root, bdf)
            device = Device(
                backend=self.name,
                vendor="rebellions",
                type=DeviceType.NPU,
                model=model.name,
                architecture=model.architecture,
                uuid=self._uuid(entry),
                index=_integer(entry.get("npu")),
                memory_bytes=_integer(_field(entry, "memory", "total")) or None,
                compute_units=model.engines or None,
                pci_bus_id=bdf,
                pcie_root=pci.pcie_root(self.host.root, bdf),
                numa_node=numa,
                driver_version=kmd,
                firmware_version=_text(entry.get("fw_ver")),
                precisions=model.precisions,
                # NPUs of one RSD group can form a tensor-parallel group over PCIe peer-to-peer.
                interconnect=Interconnect("rsd", f"rsd-{group}") if len(members) > 1 else None,
                peers=tuple(m for m in members if m != identity) if len(members) > 1 else (),
                extra={"npu.rebellions.ai/productName": (product or "")[:64]},
            )
            devices.append(device)
            npus[device.name] = entry
        self._npus = npus
        return devices

    def device_edits(self, device: Device) -> ContainerEdits:
        entry = self._npus.get(device.name)
        minor = _minor(entry) if entry is not None else None
        if entry is None or minor is None:
            raise BackendUnavailable(f"{device.name} is no longer present")
        # rbln-smi's output names the node; anything but rbln<N> (a path, say) is not trusted.
        named = _text(entry.get("device")) or ""
        name = named if re.fullmatch(r"rbln\d+", named) else f"rbln{minor}"
        node = self.host.device_node(f"/dev/{name}", major_name="rbln", minor=minor)
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
                current = self._current()
            except BackendUnavailable as err:
                current = {}
                if not last:
                    raise BackendUnavailable(f"cannot watch NPU health: {err}") from err
            for name, entry in list(self._npus.items()):
                now = current.get(_bdf(entry) or "")
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
        current = self._current()
        samples = []
        for name, entry in self._npus.items():
            now = current.get(_bdf(entry) or "", {})
            memory = _field(now, "memory") or {}
            samples.append(
                DeviceSample(
                    device=name,
                    utilization=_number(now.get("util"), 1 / 100),
                    memory_used_bytes=_integer(_field(memory, "used")),
                    memory_limit_bytes=_integer(_field(memory, "total")),
                    temperature_celsius=_number(now.get("temperature")),
                    power_watts=_number(now.get("power")),
                )
            )
        return samples

    def _current(self) -> dict[str, dict[str, Any]]:
        """rbln-smi's entries now, by PCI address."""
        devices = self.read().get("devices") or []
        return {bdf: d for d in devices if isinstance(d, dict) and (bdf := _bdf(d))}

    @staticmethod
    def _uuid(entry: dict[str, Any]) -> str:
        value = str(entry.get("uuid") or "")
        return "" if value in ("", ZERO_UUID) else value


def _field(entry: dict[str, Any], *keys: str) -> Any:
    """A nested field, or None when rbln-smi left it out or gave it another shape."""
    value: Any = entry
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value and value != "N/A" else None


def _bdf(entry: dict[str, Any]) -> str | None:
    text = _text(_field(entry, "pci", "bus_id"))
    bdf = pci.normalize_bdf(text) if text else None
    return bdf if bdf and pci.is_bdf(bdf) else None


def _minor(entry: dict[str, Any]) -> int | None:
    """The NPU's device minor: its `npu` number, else the digits of its `device` name (rbln3)."""
    number = _integer(entry.get("npu"))
    if number is not None:
        return number
    name = _text(entry.get("device")) or ""
    digits = name.removeprefix("rbln")
    return int(digits) if digits.isdigit() else None


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
