"""Reading the host without running it: the loader cache parsed as ldconfig reads it, links
followed under a root prefix, NUMA from local CPUs, and failed optional reads logged once."""

from __future__ import annotations

import logging
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from driver import pci
from driver.reads import OptionalReads, first_known
from support.hosts import FakeHost, ld_cache_bytes
from vendors import ldcache
from vendors.host import Host


@pytest.mark.skipif(shutil.which("ldconfig") is None, reason="no ldconfig to compare with")
def test_the_parser_reads_this_machines_cache_as_ldconfig_does() -> None:
    listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    expected = re.findall(r"^\t(\S+) \(.*\) => (\S+)$", listed, re.MULTILINE)
    parsed = ldcache.parse(Path("/etc/ld.so.cache").read_bytes())
    assert expected and [(e.soname, e.path) for e in parsed] == expected


@pytest.mark.skipif(shutil.which("ldconfig") is None, reason="no ldconfig to compare with")
def test_the_test_writer_makes_caches_ldconfig_reads(tmp_path: Path) -> None:
    cache = tmp_path / "ld.so.cache"
    cache.write_bytes(ld_cache_bytes([("libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1")]))
    listed = subprocess.run(
        ["ldconfig", "-p", "-C", str(cache)], capture_output=True, text=True, check=True
    ).stdout
    assert "libcuda.so.1 (libc6,x86-64) => /usr/local/nvidia/lib64/libcuda.so.1" in listed


def test_the_old_format_and_garbage() -> None:
    strings = b"libz.so.1\0/lib/libz.so.1\0"
    old = struct.pack("<12sI", b"ld.so-1.7.0", 1) + struct.pack("<iII", 0x0303, 0, 10) + strings
    assert [(e.soname, e.path) for e in ldcache.parse(old)] == [("libz.so.1", "/lib/libz.so.1")]
    combined = old + b"\0" * 3 + ld_cache_bytes([("libcuda.so.1", "/x/libcuda.so.1")])
    assert [e.soname for e in ldcache.parse(combined)] == ["libcuda.so.1"]
    assert ldcache.parse(b"garbage") == [] and ldcache.parse(ldcache.NEW_MAGIC + b"\1") == []


def test_lookup_takes_the_first_entry_of_this_architecture() -> None:
    entries = ldcache.parse(
        ld_cache_bytes(
            [("libcuda.so.1", "/first/libcuda.so.1"), ("libcuda.so.1", "/lib/libcuda.so.1")]
        )
    )
    assert ldcache.lookup(entries, "libcuda.so.1", "x86_64") == "/first/libcuda.so.1"
    assert ldcache.lookup(entries, "libcuda.so.1", "aarch64") is None
    assert ldcache.lookup(entries, "libnvidia-ml.so.1", "x86_64") is None


def test_links_are_followed_inside_the_root(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path / "host")
    fake.file("/usr/local/nvidia/lib64/libcuda.so.580.159.04", "ELF")
    fake.link("/usr/local/nvidia/lib", "lib64")
    fake.link("/usr/local/nvidia/lib64/libcuda.so.1", "libcuda.so.580.159.04")
    fake.link(
        "/usr/lib/libcuda.so.1", "/usr/local/nvidia/lib/libcuda.so.1"
    )  # absolute: the host's /
    fake.link("/loop", "/loop")
    host = Host(fake.root)
    assert host.resolve("/usr/lib/libcuda.so.1") == "/usr/local/nvidia/lib64/libcuda.so.580.159.04"
    assert host.resolve("/usr/local/nvidia/lib/../lib64/libcuda.so.1") == (
        "/usr/local/nvidia/lib64/libcuda.so.580.159.04"
    )
    assert host.resolve("/loop") is None and host.resolve("/missing") is None


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3,8", {0, 1, 2, 3, 8}), ("5\n", {5}), ("", set()), ("garbage", set()), ("2-x", set())],
)
def test_cpulists(text: str, cpus: set[int]) -> None:
    assert pci.parse_cpulist(text) == cpus


def test_numa_only_when_one_node_holds_the_cpus(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    assert pci.numa_of_cpus(tmp_path, frozenset({0})) is None  # no nodes shown: unknown
    host.file("/sys/devices/system/node/node0/cpulist", "0-7\n")
    host.file("/sys/devices/system/node/node1/cpulist", "8-15\n")
    assert pci.numa_of_cpus(tmp_path, frozenset(range(8, 12))) == 1
    assert pci.numa_of_cpus(tmp_path, frozenset(range(16))) is None
    assert pci.numa_of_cpus(tmp_path, frozenset()) is None
    sysfs = host.pci("0000:3b:00.0", 0x10DE, 0x2335, 0x030200, numa=-1)
    host.file(f"/{sysfs.relative_to(tmp_path)}/local_cpulist", "0-7\n")
    function = pci.read(tmp_path, "0000:3b:00.0")
    assert function is not None and function.numa_node == 0


def test_a_failed_read_is_logged_once_per_device_and_call(caplog: pytest.LogCaptureFixture) -> None:
    reads = OptionalReads(logging.getLogger("test.reads"))
    caplog.set_level(logging.WARNING, logger="test.reads")

    def fails() -> int:
        raise PermissionError("no")

    for _ in range(3):
        assert reads.read("0000:3b:00.0", "numa", fails, (OSError,)) is None
    assert reads.read("0000:3c:00.0", "numa", fails, (OSError,)) is None
    assert reads.read("0000:3c:00.0", "numa", lambda: 1, (OSError,)) == 1
    assert [
        (r.__dict__["device"], r.__dict__["call"], r.__dict__["error"]) for r in caplog.records
    ] == [
        ("0000:3b:00.0", "numa", "PermissionError: no"),
        ("0000:3c:00.0", "numa", "PermissionError: no"),
    ]
    with pytest.raises(ValueError):  # only the errors named are a fallback
        reads.read("d", "c", lambda: int("x"), (OSError,))
    asked: list[str] = []
    assert first_known(lambda: asked.append("a"), lambda: 2, lambda: asked.append("c")) == 2
    assert asked == ["a"]


def test_an_unreadable_file_is_logged_an_absent_one_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = Host(tmp_path)
    (tmp_path / "sys").mkdir()
    (tmp_path / "sys/numa_node").mkdir()  # reading it fails with EISDIR
    caplog.set_level(logging.WARNING, logger="vendors.host")
    assert host.read("/sys/absent") is None and host.read("/sys/numa_node", "x") == "x"
    assert [(r.__dict__["call"], r.__dict__["error"].split(":")[0]) for r in caplog.records] == [
        ("read numa_node", "IsADirectoryError")
    ]
    assert host.number("/sys/absent") is None
