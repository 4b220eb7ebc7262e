"""Fake host trees (sysfs, devfs, procfs) under a root prefix, as the kernel lays them out."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def file(self, path: str, text: str = "", mode: int = 0o644) -> Path:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        return target

    def executable(self, path: str, script: str) -> Path:
        return self.file(path, "#!/bin/sh\n" + script, mode=0o755)

    def link(self, path: str, target: str) -> None:
        source = self.root / path.lstrip("/")
        source.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            source.unlink()
        source.symlink_to(target)

    def pci(
        self,
        bdf: str,
        vendor: int,
        device: int,
        class_code: int,
        numa: int = -1,
        driver: str | None = None,
        root_bus: str | None = None,
    ) -> Path:
        """A PCI function under /sys/devices/pci<domain>:<root_bus>/..., linked from /sys/bus/pci/devices."""
        domain = bdf[:4]
        root = root_bus or bdf[5:7]
        directory = f"/sys/devices/pci{domain}:{root}/{domain}:{root}:01.0/{bdf}"
        self.file(f"{directory}/vendor", f"0x{vendor:04x}\n")
        self.file(f"{directory}/device", f"0x{device:04x}\n")
        self.file(f"{directory}/class", f"0x{class_code:06x}\n")
        self.file(f"{directory}/numa_node", f"{numa}\n")
        self.link(
            f"/sys/bus/pci/devices/{bdf}",
            os.path.relpath(self.root / directory.lstrip("/"), self.root / "sys/bus/pci/devices"),
        )
        if driver:
            self.file(f"/sys/bus/pci/drivers/{driver}/.keep")
            self.link(
                f"{directory}/driver",
                os.path.relpath(
                    self.root / f"sys/bus/pci/drivers/{driver}", self.root / directory.lstrip("/")
                ),
            )
        return self.root / directory.lstrip("/")

    def proc_devices(self, char: dict[str, int]) -> None:
        lines = ["Character devices:"] + [f"{major:3d} {name}" for name, major in char.items()]
        self.file("/proc/devices", "\n".join([*lines, "", "Block devices:", "  8 sd", ""]))

    def char_node(self, path: str, major: int, minor: int) -> None:
        """A real character device node in the fake /dev (tests run as root, as the driver does)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(major, minor))

    def char_device(self, sysfs_dir: str, major: int, minor: int) -> None:
        """A class device's `dev` file, as /sys/class/<subsystem>/<name>/dev holds it."""
        self.file(f"{sysfs_dir}/dev", f"{major}:{minor}\n")
