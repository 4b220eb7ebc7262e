"""PCI functions as sysfs shows them under a host root, and matching them to backends.

Backends declare the PCI functions they serve (`pci_matches` on the factory), so picking
backends on start is a scan of /sys/bus/pci/devices and no vendor library is loaded for
hardware that is not there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


@dataclass(frozen=True)
class PciFunction:
    bdf: str
    vendor: int
    device: int
    class_code: int
    numa_node: int | None
    driver: str | None
    pcie_root: str | None
    sysfs: Path

    @property
    def class_prefix(self) -> int:
        """Base class and subclass, e.g. 0x0302 for a 3D controller."""
        return self.class_code >> 8


@dataclass(frozen=True)
class PciMatch:
    """Which functions a backend serves: a vendor, optionally narrowed by class and device ids."""

    vendor: int
    classes: tuple[int, ...] = ()
    devices: tuple[int, ...] = ()

    def matches(self, function: PciFunction) -> bool:
        return (
            function.vendor == self.vendor
            and (not self.classes or function.class_prefix in self.classes)
            and (not self.devices or function.device in self.devices)
        )


def scan(host_root: Path) -> list[PciFunction]:
    """Every PCI function of the host, in address order; empty when sysfs is not there."""
    base = host_root / "sys/bus/pci/devices"
    if not base.is_dir():
        return []
    return [
        f
        for name in sorted(os.listdir(base))
        if _BDF.match(name)
        for f in [read(host_root, name)]
        if f
    ]


def read(host_root: Path, bdf: str) -> PciFunction | None:
    path = host_root / "sys/bus/pci/devices" / bdf
    try:
        vendor = int((path / "vendor").read_text(), 16)
        device = int((path / "device").read_text(), 16)
        class_code = int((path / "class").read_text(), 16)
    except (OSError, ValueError):
        return None
    return PciFunction(
        bdf=bdf,
        vendor=vendor,
        device=device,
        class_code=class_code,
        numa_node=function_numa(host_root, path),
        driver=_link_name(path / "driver"),
        pcie_root=pcie_root(host_root, bdf),
        sysfs=path,
    )


def numa_node(sysfs_dir: Path) -> int | None:
    """The function's NUMA node; sysfs says -1 on single-node machines, which means unknown."""
    try:
        return parse_numa((sysfs_dir / "numa_node").read_text())
    except OSError:
        return None


def numa_of(host_root: Path, bdf: str) -> int | None:
    """The NUMA node of the function at `bdf`, for a vendor tool that could not say it."""
    return function_numa(host_root, host_root / "sys/bus/pci/devices" / bdf)


def function_numa(host_root: Path, sysfs_dir: Path) -> int | None:
    """The function's NUMA node: sysfs `numa_node`, else the one node holding its local CPUs."""
    node = numa_node(sysfs_dir)
    return node if node is not None else numa_of_cpus(host_root, local_cpus(sysfs_dir))


def parse_numa(value: object) -> int | None:
    """A NUMA node as sysfs or a vendor tool reports it; -1, empty and garbage mean unknown."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def parse_cpulist(text: str) -> frozenset[int]:
    """CPUs in the kernel's list format (`0-15,32-47`); empty for garbage."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        first, dash, last = part.partition("-")
        try:
            cpus.update(range(int(first), int(last if dash else first) + 1))
        except ValueError:
            return frozenset()
    return frozenset(cpus)


def local_cpus(sysfs_dir: Path) -> frozenset[int]:
    """The CPUs local to a PCI function (`local_cpulist`); empty when sysfs does not say."""
    try:
        return parse_cpulist((sysfs_dir / "local_cpulist").read_text())
    except OSError:
        return frozenset()


def numa_of_cpus(host_root: Path, cpus: frozenset[int]) -> int | None:
    """The one NUMA node whose CPUs include `cpus`, from /sys/devices/system/node/node*/cpulist.

    None when the CPUs span several nodes (a function local to every CPU says nothing about
    its node), when no node lists them, or when the host shows no nodes: never a guess.
    """
    if not cpus:
        return None
    nodes = set()
    for path in (host_root / "sys/devices/system/node").glob("node[0-9]*/cpulist"):
        try:
            node_cpus = parse_cpulist(path.read_text())
        except OSError:
            return None
        if node_cpus & cpus:
            nodes.add(int(path.parent.name[4:]))
    return nodes.pop() if len(nodes) == 1 else None


def pcie_root(host_root: Path, bdf: str) -> str | None:
    """`pci<domain>:<bus>`: the first component under /sys/devices of the function's real path."""
    link = host_root / "sys/bus/pci/devices" / bdf
    try:
        resolved = link.resolve(strict=True)
        parts = resolved.relative_to((host_root / "sys/devices").resolve()).parts
    except (OSError, ValueError):
        return None
    return parts[0] if parts and parts[0].startswith("pci") else None


def normalize_bdf(value: str) -> str:
    """Kernel form `dddd:bb:dd.f` from NVML's `00000000:1B:00.0` and friends."""
    text = value.strip().lower()
    domain, _, rest = text.rpartition(":")
    domain, _, bus = domain.rpartition(":") if domain.count(":") else ("", "", domain)
    domain = domain[-4:].rjust(4, "0") if domain else "0000"
    return f"{domain}:{bus.rjust(2, '0')}:{rest}"


def is_bdf(value: str) -> bool:
    """Whether `value` is a PCI address in kernel form (`dddd:bb:dd.f`)."""
    return bool(_BDF.match(value))


def select(functions: Sequence[PciFunction], matches: Sequence[PciMatch]) -> list[PciFunction]:
    return [f for f in functions if any(m.matches(f) for m in matches)]


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None
