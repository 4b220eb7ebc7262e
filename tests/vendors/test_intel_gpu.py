"""Intel GPU backend on fake sysfs trees: i915 and xe, model table, by-path mounts, VFs and unbound GPUs skipped."""

from __future__ import annotations

import threading

import pytest

from driver import conformance
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from support import faults
from support.hosts import FakeHost
from vendors.intel_gpu import IntelGpuBackend


def gpu(host: FakeHost, bdf: str, device: int, driver: str | None, card: int, numa: int = 0) -> str:
    base = host.pci(bdf, 0x8086, device, 0x038000, numa=numa, driver=driver)
    sysfs = f"/{base.relative_to(host.root)}"
    host.file(f"{sysfs}/drm/card{card}/.keep")
    host.file(f"{sysfs}/drm/renderD{127 + card}/.keep")
    host.char_device(f"/sys/class/drm/card{card}", 226, card)
    host.char_device(f"/sys/class/drm/renderD{127 + card}", 226, 127 + card)
    return sysfs


@pytest.fixture
def node(host: FakeHost) -> FakeHost:
    host.file("/sys/module/xe/.keep")
    host.file("/sys/module/i915/version", "1.3.30049\n")
    host.file("/proc/sys/kernel/osrelease", "6.8.0-49-generic\n")
    max1100 = gpu(host, "0000:98:00.0", 0x0BDA, "i915", 1, numa=1)
    host.file(f"{max1100}/hwmon/hwmon3/energy1_input", "123456789\n")
    xe = gpu(host, "0000:b3:00.0", 0xE20B, "xe", 2)
    host.file(f"{xe}/tile0/physical_vram_size_bytes", "12884901888\n")
    host.file("/dev/dri/card1")  # the host's device node, as /host/dev shows it
    host.link("/dev/dri/by-path/pci-0000:98:00.0-card", "../card1")
    host.link("/dev/dri/by-path/pci-0000:98:00.0-render", "../renderD199")  # dangling
    gpu(host, "0000:c1:00.0", 0x56C0, "vfio-pci", 3)  # handed to a VM: not ours
    vf = gpu(host, "0000:98:00.1", 0x0BDA, "i915", 4)
    host.link(f"{vf}/physfn", "../0000:98:00.0")  # an SR-IOV virtual function
    host.pci("0000:00:02.0", 0x8086, 0x4680, 0x060000)  # a host bridge, not a GPU
    return host


def test_conformance_and_discovery(node: FakeHost) -> None:
    backend = IntelGpuBackend(BackendContext(host_root=node.root, node_name="node-a"))
    found = conformance.check(backend)
    devices = {d.name: d for d in found.devices}
    assert sorted(devices) == ["gpu-0000-98-00-0", "gpu-0000-b3-00-0"]
    max1100 = devices["gpu-0000-98-00-0"]
    assert (max1100.model, max1100.architecture, max1100.compute_target) == (
        "Intel Data Center GPU Max 1100",
        "xe-hpc",
        "pvc",
    )
    assert (
        max1100.memory_bytes == 48 * 2**30
        and max1100.compute_units == 56
        and "fp64" in max1100.precisions
    )
    assert max1100.driver_version == "1.3.30049" and max1100.numa_node == 1
    arc = devices["gpu-0000-b3-00-0"]
    assert arc.memory_bytes == 12884901888 and arc.driver_version == "6.8.0-49-generic"
    edits = backend.device_edits(max1100)
    assert [(n.path, n.minor) for n in edits.device_nodes] == [
        ("/dev/dri/card1", 1),
        ("/dev/dri/renderD128", 128),
    ]
    # The dangling render link is left out: its missing source would fail the container's start.
    assert [m.container_path for m in edits.mounts] == ["/dev/dri/by-path/pci-0000:98:00.0-card"]


def test_uuid_is_stable_and_node_specific(node: FakeHost) -> None:
    a = IntelGpuBackend(BackendContext(host_root=node.root, node_name="node-a")).discover()
    again = IntelGpuBackend(BackendContext(host_root=node.root, node_name="node-a")).discover()
    other = IntelGpuBackend(BackendContext(host_root=node.root, node_name="node-b")).discover()
    assert [d.uuid for d in a] == [d.uuid for d in again]
    assert {d.uuid for d in a}.isdisjoint({d.uuid for d in other})


def test_an_unbound_gpu_is_reported_lost(node: FakeHost) -> None:
    backend = IntelGpuBackend(BackendContext(host_root=node.root, options={"poll-seconds": "0.01"}))
    backend.discover()
    (node.root / "sys/devices/pci0000:b3/0000:b3:01.0/0000:b3:00.0/driver").unlink()
    stop = threading.Event()
    event = next(backend.health_events(stop))
    stop.set()
    assert (event.device, event.kind) == ("gpu-0000-b3-00-0", "lost")


def test_energy_from_hwmon(node: FakeHost) -> None:
    backend = IntelGpuBackend(BackendContext(host_root=node.root))
    backend.discover()
    assert {s.device: s.energy_joules for s in backend.sample()}[
        "gpu-0000-98-00-0"
    ] == pytest.approx(123.456789)


def test_no_intel_driver_is_one_line(host: FakeHost) -> None:
    with pytest.raises(
        BackendUnavailable, match="neither the i915 nor the xe kernel driver is loaded"
    ):
        IntelGpuBackend(BackendContext(host_root=host.root))


def test_every_optional_read_may_fail(node: FakeHost) -> None:
    """The conformance property: each sysfs file but the PCI identity missing, unreadable,
    failing or garbage in turn loses no GPU."""

    def build() -> IntelGpuBackend:
        return IntelGpuBackend(BackendContext(host_root=node.root, node_name="node-a"))

    broken = faults.file_faults(node.root, lambda: build().discover())
    assert {"version", "physical_vram_size_bytes", "numa_node"} <= {
        label.split(" ")[2].rsplit("/", 1)[-1] for label, _ in broken
    }
    assert conformance.check_optional_reads(build, broken) == len(broken)
