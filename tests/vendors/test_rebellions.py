"""Rebellions backend: a fake `rbln-smi` on the host printing recorded `rbln-smi -j` JSON."""

from __future__ import annotations

import json
import shlex
import threading
from pathlib import Path

import pytest

from driver import conformance
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from support import container, faults
from support.hosts import FakeHost
from vendors.rebellions import RebellionsBackend

RECORDING = Path(__file__).resolve().parents[1] / "fixtures" / "rebellions" / "rbln-smi-atom.json"


@pytest.fixture
def atom(host: FakeHost) -> FakeHost:
    json_file = host.file("/var/lib/fixture/rbln.json", RECORDING.read_text())
    host.executable(
        "/usr/bin/rbln-smi", f'[ "$1" = "-j" ] || exit 2\ncat {shlex.quote(str(json_file))}\n'
    )
    for bus in ("3b", "3c", "5e", "5f"):
        # rbln-smi reports the numa_node sysfs shows: -1 (unknown) for 5e.
        numa = -1 if bus == "5e" else 0
        host.pci(f"0000:{bus}:00.0", 0x1EFF, 0x1220, 0x120000, numa=numa, driver="rebellions")
    host.proc_devices({"rbln": 507})
    host.char_node("/dev/rbln0", 507, 0)
    return host


def test_conformance_and_discovery(atom: FakeHost) -> None:
    backend = RebellionsBackend(BackendContext(host_root=atom.root))
    found = conformance.check(backend)
    devices = {d.name: d for d in found.devices}
    assert sorted(devices) == [
        "npu-0000-3b-00-0",
        "npu-0000-3c-00-0",
        "npu-0000-5e-00-0",
        "npu-0000-5f-00-0",
    ]
    first = devices["npu-0000-3b-00-0"]
    assert (first.model, first.memory_bytes, first.driver_version, first.firmware_version) == (
        "Rebellions ATOM+",
        16 * 2**30,
        "1.3.73",
        "1.3.73",
    )
    assert devices["npu-0000-3c-00-0"].uuid == ""  # an all-zero UUID is no identity
    assert devices["npu-0000-5e-00-0"].numa_node is None  # -1 is unknown
    assert first.interconnect is not None and len(first.peers) == 3
    # /dev/rbln0 exists on the host; rbln1 is numbered from /proc/devices.
    assert [(n.path, n.major, n.minor) for n in backend.device_edits(first).device_nodes] == [
        ("/dev/rbln0", 507, 0)
    ]
    assert [
        (n.path, n.major, n.minor)
        for n in backend.device_edits(devices["npu-0000-3c-00-0"]).device_nodes
    ] == [("/dev/rbln1", 507, 1)]


def test_a_device_name_that_is_not_rbln_n_is_not_trusted_as_a_path(atom: FakeHost) -> None:
    recording = json.loads(RECORDING.read_text())
    recording["devices"][0]["device"] = "../sda"  # what a broken or hostile rbln-smi could print
    atom.file("/var/lib/fixture/rbln.json", json.dumps(recording))
    backend = RebellionsBackend(BackendContext(host_root=atom.root))
    first = next(d for d in backend.discover() if d.name == "npu-0000-3b-00-0")
    assert [n.path for n in backend.device_edits(first).device_nodes] == ["/dev/rbln0"]


def test_status_and_metrics(atom: FakeHost) -> None:
    backend = RebellionsBackend(
        BackendContext(host_root=atom.root, options={"poll-seconds": "0.01"})
    )
    backend.discover()
    sample = next(s for s in backend.sample() if s.device == "npu-0000-3b-00-0")
    assert (sample.utilization, sample.memory_used_bytes, sample.temperature_celsius) == (
        0.125,
        268435456,
        41.0,
    )
    json_file = atom.root / "var/lib/fixture/rbln.json"
    recording = json.loads(json_file.read_text())
    recording["devices"][2]["status"] = "error"
    json_file.write_text(json.dumps(recording))
    stop = threading.Event()
    event = next(backend.health_events(stop))
    stop.set()
    assert (event.device, event.code, event.healthy) == ("npu-0000-5e-00-0", "error", False)


def test_missing_cli_is_one_line(host: FakeHost) -> None:
    with pytest.raises(
        BackendUnavailable, match=r"rbln-smi not found \(looked for /usr/bin/rbln-smi"
    ):
        RebellionsBackend(BackendContext(host_root=host.root)).discover()


def test_failing_cli_reports_its_own_words(host: FakeHost) -> None:
    host.executable("/usr/bin/rbln-smi", "echo 'rbln driver is not loaded' >&2\nexit 3\n")
    with pytest.raises(
        BackendUnavailable, match="rbln-smi failed with exit code 3: rbln driver is not loaded"
    ):
        RebellionsBackend(BackendContext(host_root=host.root)).discover()


def test_every_optional_read_may_fail(atom: FakeHost) -> None:
    """The conformance property: each field of `rbln-smi -j` but the PCI address missing, "N/A"
    or null in turn (the npu number and the device name each stand in for the other), and each
    sysfs file failing, loses no NPU."""

    def build() -> RebellionsBackend:
        return RebellionsBackend(BackendContext(host_root=atom.root))

    document = atom.root / "var/lib/fixture/rbln.json"
    broken = faults.json_field_faults(document, "devices", frozenset({"devices.pci.bus_id"}))
    assert {"devices.npu", "devices.device", "devices.memory.total", "KMD_version"} <= {
        label.split(" ")[0] for label, _ in broken
    }
    broken += faults.file_faults(atom.root, lambda: build().discover())
    assert conformance.check_optional_reads(build, broken) == len(broken)


def test_a_rebellions_container_gets_its_npu_node(atom: FakeHost, tmp_path: Path) -> None:
    """The RBLN runtime ships with the image; the claim gives the NPU's /dev/rbln node. Which
    host files Rebellions' own container toolkit adds is not documented (docs/backends.md)."""
    backend = RebellionsBackend(BackendContext(host_root=atom.root))
    seen = container.view(backend, list(backend.discover()[:1]), atom.root, tmp_path / "rootfs")
    assert seen.path("/dev/rbln0").is_file()
