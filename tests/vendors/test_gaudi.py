"""Gaudi backend on a fake habanalabs sysfs tree: accel nodes, visibility env, hook, RoCE mesh, status health."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from driver import conformance
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from support import container, faults
from support.hosts import FakeHost
from vendors.gaudi import GaudiBackend

BUSES = ["19", "1a", "4d", "4e", "9b", "9c", "cd", "ce"]


@pytest.fixture
def board(host: FakeHost) -> FakeHost:
    host.file("/sys/module/habanalabs/version", "1.20.0-2d3e4f5\n")
    for index, bus in enumerate(BUSES):
        base = host.pci(
            f"0000:{bus}:00.0", 0x1DA3, 0x1060, 0x120000, numa=index // 4, driver="habanalabs"
        )
        sysfs = f"/{base.relative_to(host.root)}"
        host.file(f"{sysfs}/accel/accel{index}/.keep")
        host.file(f"{sysfs}/infiniband_verbs/uverbs{index}/.keep")
        host.file(f"{sysfs}/module_id", f"{(index + 3) % 8}\n")
        host.file(f"{sysfs}/serial_number", f"HLS3-{index:04d}\n")
        host.file(f"{sysfs}/fw_os_ver", "1.20.0-fw-57.2.1\n")
        host.file(f"{sysfs}/status", "Operational\n")
        host.char_device(f"/sys/class/accel/accel{index}", 261, index)
        host.char_device(f"/sys/class/accel/accel_controlD{index}", 261, 64 + index)
        host.char_device(f"/sys/class/infiniband_verbs/uverbs{index}", 231, 192 + index)
    host.executable("/usr/bin/habana-container-hook", "exit 0\n")
    return host


def test_conformance_and_discovery(board: FakeHost) -> None:
    backend = GaudiBackend(BackendContext(host_root=board.root))
    found = conformance.check(backend)
    assert len(found.devices) == 8
    first = found.devices[0]
    assert (first.type.value, first.model, first.architecture, first.memory_bytes) == (
        "hpu",
        "Intel Gaudi 3",
        "gaudi3",
        128 * 2**30,
    )
    assert first.uuid == "HLS3-0000" and first.interconnect is not None and len(first.peers) == 7
    nodes = [(n.path, n.major, n.minor) for n in backend.device_edits(first).device_nodes]
    assert nodes == [
        ("/dev/accel/accel0", 261, 0),
        ("/dev/accel/accel_controlD0", 261, 64),
        ("/dev/infiniband/uverbs0", 231, 192),
    ]


def test_claim_env_lists_the_claims_devices_and_modules(board: FakeHost) -> None:
    backend = GaudiBackend(BackendContext(host_root=board.root))
    devices = backend.discover()
    shared = backend.shared_edits([devices[2], devices[5]])
    assert "HABANA_VISIBLE_DEVICES=2,5" in shared.env
    assert "HABANA_VISIBLE_MODULES=5,0" in shared.env
    assert "HL_VISIBLE_DEVICES=/dev/accel/accel2,/dev/accel/accel5" in shared.env
    assert [h.args for h in shared.hooks] == [("habana-container-hook", "createRuntime")]


def test_status_changes_are_health_events(board: FakeHost) -> None:
    backend = GaudiBackend(BackendContext(host_root=board.root, options={"poll-seconds": "0.01"}))
    backend.discover()
    status = board.root / "sys/devices/pci0000:4d/0000:4d:01.0/0000:4d:00.0/status"
    stop = threading.Event()
    events = backend.health_events(stop)
    status.write_text("Needs Reset\n")
    broken = next(events)
    status.write_text("Operational\n")
    recovered = next(events)
    stop.set()
    assert (broken.device, broken.code, broken.healthy) == (
        "hpu-0000-4d-00-0",
        "Needs Reset",
        False,
    )
    assert (recovered.device, recovered.healthy) == ("hpu-0000-4d-00-0", True)


def test_no_habanalabs_is_one_line(host: FakeHost) -> None:
    with pytest.raises(BackendUnavailable, match="habanalabs kernel driver is not loaded"):
        GaudiBackend(BackendContext(host_root=host.root))


def test_every_optional_read_may_fail(board: FakeHost) -> None:
    """The conformance property: each habanalabs sysfs file but the PCI identity failing in turn
    loses no HPU (the serial number falls back to the PCI address, as the name does)."""

    def build() -> GaudiBackend:
        return GaudiBackend(BackendContext(host_root=board.root))

    broken = faults.file_faults(board.root, lambda: build().discover())
    assert {"serial_number", "module_id", "fw_os_ver", "version", "numa_node"} <= {
        label.split(" ")[2].rsplit("/", 1)[-1] for label, _ in broken
    }
    assert conformance.check_optional_reads(build, broken) == len(broken)


def test_a_gaudi_container_gets_its_nodes_env_and_the_vendor_hook(
    board: FakeHost, tmp_path: Path
) -> None:
    """SynapseAI's user space ships with Habana's images; from the host a container needs the
    accel, control and uverbs nodes, the visibility env, and habana-container-hook."""
    backend = GaudiBackend(BackendContext(host_root=board.root))
    seen = container.view(backend, list(backend.discover()[:2]), board.root, tmp_path / "rootfs")
    for node in ("/dev/accel/accel0", "/dev/accel/accel_controlD1", "/dev/infiniband/uverbs1"):
        assert seen.path(node).is_file(), node
    assert "HABANA_VISIBLE_DEVICES=0,1" in seen.env
    assert seen.other_hooks == [["habana-container-hook", "createRuntime"]]
