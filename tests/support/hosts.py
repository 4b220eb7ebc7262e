"""Fake host trees (sysfs, devfs, procfs) under a root prefix, as the kernel lays them out."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

X86_64_LIBC6 = 0x0303  # FLAG_ELF_LIBC6 | FLAG_X8664_LIB64, "(libc6,x86-64)" in `ldconfig -p`


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

    def ld_cache(self, entries: Sequence[tuple[str, str]], path: str = "/etc/ld.so.cache") -> Path:
        """An ld.so.cache in glibc's current format, as ldconfig writes it: (soname, path) pairs."""
        return self.file_bytes(path, ld_cache_bytes(entries))

    def file_bytes(self, path: str, data: bytes) -> Path:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target


def ld_cache_bytes(entries: Sequence[tuple[str, str]], flags: int = X86_64_LIBC6) -> bytes:
    """glibc's "glibc-ld.so.cache1.1" layout: header, 24-byte entries, then the strings they point at."""
    header_size, entry_size = 48, 24
    strings = bytearray()
    offsets = []
    base = header_size + entry_size * len(entries)
    for soname, path in entries:
        key = base + len(strings)
        strings += soname.encode() + b"\0"
        value = base + len(strings)
        strings += path.encode() + b"\0"
        offsets.append((key, value))
    header = struct.pack("<20sIIB3xI12x", b"glibc-ld.so.cache1.1", len(entries), len(strings), 2, 0)
    body = b"".join(struct.pack("<iIIIQ", flags, key, value, 0, 0) for key, value in offsets)
    return header + body + bytes(strings)
