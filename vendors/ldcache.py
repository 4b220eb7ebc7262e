"""The dynamic loader's cache (`/etc/ld.so.cache`), read in Python: which file the loader gives a soname.

Parsing the file, rather than running the host's `ldconfig -p`, needs no host binary and no
shell, and works on a host tree mounted at /host or on a driver root such as /run/nvidia/driver.
Both formats glibc writes are read: the current one ("glibc-ld.so.cache1.1", the only one since
glibc 2.32) and the old one ("ld.so-1.7.0"), alone or followed by the current one.
"""

from __future__ import annotations

import platform
import struct
from dataclasses import dataclass

NEW_MAGIC = b"glibc-ld.so.cache1.1"
OLD_MAGIC = b"ld.so-1.7.0"
_NEW_HEADER = struct.Struct(
    "<20sII B3x I 12x"
)  # magic+version, nlibs, len_strings, flags, extension
_NEW_ENTRY = struct.Struct("<iIIIQ")  # flags, key, value, osversion, hwcap
_OLD_HEADER = struct.Struct("<12sI")  # magic (11 bytes, padded), nlibs
_OLD_ENTRY = struct.Struct("<iII")  # flags, key, value
_ELF_LIBC6 = 0x0003
# The cache's architecture flags (FLAG_*_LIB64 in glibc's ldconfig.h) for 64-bit hosts.
ARCH_FLAGS = {"x86_64": 0x0300, "aarch64": 0x0A00, "ppc64le": 0x0500, "s390x": 0x0400}


@dataclass(frozen=True)
class Entry:
    soname: str
    path: str
    flags: int

    @property
    def arch(self) -> int:
        return self.flags & 0xFF00


def parse(data: bytes) -> list[Entry]:
    """Every entry of a cache file, in the order the loader searches them; [] for anything else."""
    start = data.find(NEW_MAGIC)
    if start == 0 or (start > 0 and data.startswith(OLD_MAGIC)):
        return _parse_new(data, start)
    if data.startswith(OLD_MAGIC):
        return _parse_old(data)
    return []


def lookup(entries: list[Entry], soname: str, machine: str | None = None) -> str | None:
    """The path the loader would pick for `soname` on this architecture (the first ELF libc6 match)."""
    wanted = ARCH_FLAGS.get(machine or platform.machine())
    for entry in entries:
        if entry.soname != soname or entry.flags & 0xFF != _ELF_LIBC6:
            continue
        if wanted is None or entry.arch == wanted:
            return entry.path
    return None


def _parse_new(data: bytes, start: int) -> list[Entry]:
    try:
        _, count, _, _, _ = _NEW_HEADER.unpack_from(data, start)
        entries = []
        for index in range(count):
            flags, key, value, _, _ = _NEW_ENTRY.unpack_from(
                data, start + _NEW_HEADER.size + index * _NEW_ENTRY.size
            )
            # String offsets are relative to the start of the current-format header.
            entries.append(Entry(_string(data, start + key), _string(data, start + value), flags))
    except (struct.error, ValueError):
        return []
    return entries


def _parse_old(data: bytes) -> list[Entry]:
    try:
        _, count = _OLD_HEADER.unpack_from(data, 0)
        strings = _OLD_HEADER.size + count * _OLD_ENTRY.size
        entries = []
        for index in range(count):
            flags, key, value = _OLD_ENTRY.unpack_from(
                data, _OLD_HEADER.size + index * _OLD_ENTRY.size
            )
            entries.append(
                Entry(_string(data, strings + key), _string(data, strings + value), flags)
            )
    except (struct.error, ValueError):
        return []
    return entries


def _string(data: bytes, offset: int) -> str:
    end = data.index(b"\0", offset)
    return data[offset:end].decode("utf-8", errors="replace")
