"""FuriosaAI RNGD NPUs through furiosa-smi, with core ranges as partitions (KEP-4815).

An RNGD has 8 processing elements (PEs). With --partitions, a card also offers 1-, 2- and 4-PE
partitions; a partition is a set of device files (only the PE nodes inside its range), so
preparing one changes nothing on the card, and the PE counters keep partitions from overlapping.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from driver import pci
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from driver.model import (
    ContainerEdits,
    Device,
    DeviceNode,
    DeviceSample,
    DeviceType,
    HealthEvent,
    Partition,
    PartitionLayout,
)
from driver.pci import PciMatch
from driver.reads import OptionalReads
from vendors.host import Host

log = logging.getLogger(__name__)
PES = 8
POLL_SECONDS = 5.0
# PE device files are npu<N>pe<X> or fused npu<N>pe<X>-<Y> (furiosa-device-plugin's pattern).
_PE_FILE = re.compile(r"npu\d+pe(\d+)(?:-(\d+))?$")
_ARCHITECTURES = {
    "Rngd": "rngd",
    "RngdMax": "rngd-max",
    "RngdS": "rngd-s",
    "RngdPlus": "rngd-plus",
    "Warboy": "warboy",
}


@dataclass(frozen=True)
class _Card:
    handle: Any
    files: tuple[str, ...]


class FuriosaBackend:
    name = "furiosa"
    pci_matches = (PciMatch(0x1ED2),)

    def __init__(self, context: BackendContext, smi: ModuleType | None = None) -> None:
        self.host = Host(context.host_root)
        self.poll_seconds = float(context.options.get("poll-seconds", POLL_SECONDS))
        self.smi = smi or _import_smi()
        self.reads = OptionalReads(log)
        self._cards: dict[str, _Card] = {}

    def discover(self) -> Sequence[Device]:
        """An NPU needs its PCI address and device files from furiosa-smi; the rest is optional."""
        smi = self.smi
        try:
            cards = smi.list_devices()
        except smi.SmiError as err:
            raise BackendUnavailable(f"furiosa-smi cannot list the NPUs: {err}") from err
        errors = (smi.SmiError, TypeError, ValueError, AttributeError)
        driver = self.reads.read("system", "driver_info", smi.driver_info, errors)
        driver_version = f"{driver.major}.{driver.minor}.{driver.patch}" if driver else None
        devices, found = [], {}
        for card in cards:
            try:
                bdf = pci.normalize_bdf(str(card.bdf()))
                files = tuple(str(f.path) for f in card.device_files())
            except smi.SmiError as err:
                log.warning("Skipping an NPU furiosa-smi cannot name", extra={"error": str(err)})
                continue

            def read(call: str, card: Any = card, bdf: str = bdf) -> Any:
                # getattr inside the read: a library without the call is a failed read too.
                return self.reads.read(bdf, call, lambda: getattr(card, call)(), errors)

            numa = pci.parse_numa(read("numa_node"))
            if numa is None:
                numa = pci.numa_of(self.host.root, bdf)
            memory = read("memory_usage")
            product = read("product_name")
            arch = read("arch")
            firmware = read("firmware_version")
            device = Device(
                backend=self.name,
                vendor="furiosa",
                type=DeviceType.NPU,
                model=f"FuriosaAI {product or 'NPU'}",
                architecture=_ARCHITECTURES.get(str(arch).rsplit(".", 1)[-1], "unknown")
                if arch is not None
                else "unknown",
                uuid=str(read("uuid") or ""),
                index=_integer(read("dev_node_index")),
                memory_bytes=_integer(getattr(memory, "total_bytes", None)) or None,
                compute_units=_integer(read("core_num")) or None,
                pci_bus_id=bdf,
                pcie_root=pci.pcie_root(self.host.root, bdf),
                numa_node=numa,
                driver_version=driver_version,
                firmware_version=str(firmware) if firmware is not None else None,
                precisions=frozenset({"bf16", "fp8", "int8", "int4"}),
            )
            devices.append(device)
            found[device.name] = _Card(card, files)
        self._cards = found
        return devices

    def device_edits(self, device: Device) -> ContainerEdits:
        return ContainerEdits(device_nodes=self._nodes(device, 0, PES))

    def shared_edits(self, devices: Sequence[Device]) -> ContainerEdits:
        return ContainerEdits()

    def partition_layout(self, device: Device) -> PartitionLayout | None:
        if not device.memory_bytes:
            return None  # memory counters need the card's memory size
        per_pe = device.memory_bytes // PES
        counters = {"memory": device.memory_bytes, "compute-units": PES} | {
            f"pe-{i}": 1 for i in range(PES)
        }
        partitions = []
        for size in (1, 2, 4):
            for start in range(0, PES, size):
                partitions.append(
                    Partition(
                        parent=device,
                        suffix=f"{size}pe-{start}",
                        profile=f"{size}pe.{size * per_pe // (1 << 30)}gb",
                        placement=start,
                        memory_bytes=size * per_pe,
                        compute_units=size,
                        consumes={"memory": size * per_pe, "compute-units": size}
                        | {f"pe-{i}": 1 for i in range(start, start + size)},
                    )
                )
        return PartitionLayout(counters=counters, partitions=tuple(partitions))

    def partition_edits(self, partition: Partition) -> ContainerEdits:
        return ContainerEdits(
            device_nodes=self._nodes(partition.parent, partition.placement, partition.compute_units)
        )

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        """furiosa-smi's liveness check; a card that stops answering is lost, and comes back when it answers."""
        alive: dict[str, bool] = {}
        while True:
            for name, card in list(self._cards.items()):
                try:
                    now = bool(card.handle.liveness())
                except self.smi.SmiError:
                    now = False
                if alive.get(name, True) != now:
                    yield HealthEvent(
                        name,
                        "lost",
                        message="liveness check " + ("passed" if now else "failed"),
                        healthy=now,
                    )
                alive[name] = now
            if stop.wait(self.poll_seconds):
                return

    def sample(self) -> Sequence[DeviceSample]:
        errors = (self.smi.SmiError, TypeError, ValueError, AttributeError)
        samples = []
        for name, card in self._cards.items():

            def read(call: str, card: Any = card, name: str = name) -> Any:
                return self.reads.read(name, call, lambda: getattr(card.handle, call)(), errors)

            memory, power, temperature = (
                read("memory_usage"),
                read("power_consumption"),
                read("device_temperature"),
            )
            samples.append(
                DeviceSample(
                    device=name,
                    memory_used_bytes=_integer(getattr(memory, "in_use_bytes", None)),
                    memory_limit_bytes=_integer(getattr(memory, "total_bytes", None)),
                    power_watts=float(power) if power is not None else None,
                    temperature_celsius=float(temperature.soc_peak) if temperature else None,
                )
            )
        return samples

    def _nodes(self, device: Device, start: int, size: int) -> tuple[DeviceNode, ...]:
        card = self._cards.get(device.name)
        if card is None:
            raise BackendUnavailable(f"{device.name} is no longer present")
        wanted = range(start, start + size)
        nodes = []
        for path in card.files:
            pes = _PE_FILE.search(path)
            if pes is not None:
                first = int(pes.group(1))
                last = int(pes.group(2) or first)
                if first not in wanted or last not in wanted:
                    continue  # a PE file reaching outside the partition's range
            node = self.host.device_node(path)
            if node is None:
                raise BackendUnavailable(f"{device.name}: {path} is not a device node on the host")
            nodes.append(node)
        return tuple(nodes)


def _integer(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _import_smi() -> ModuleType:
    try:
        import furiosa_smi
    except ImportError as err:
        raise BackendUnavailable(
            "furiosa-smi is not installed: pip install 'unidra[furiosa]'"
        ) from err
    module: ModuleType = furiosa_smi
    return module
