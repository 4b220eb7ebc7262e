"""TPU backend on fake trees: v4 chips on /dev/accel, v6e chips behind vfio-pci, non-TPU Google devices ignored."""

from __future__ import annotations

from pathlib import Path

from driver import conformance
from driver.backends import BackendContext
from support import container, faults
from support.hosts import FakeHost
from vendors.tpu import TpuBackend


def v6e_host(host: FakeHost) -> FakeHost:
    for index in range(4):
        base = host.pci(f"0000:00:{index + 4:02x}.0", 0x1AE0, 0x006F, 0x120000, driver="vfio-pci")
        host.link(
            f"/{base.relative_to(host.root)}/iommu_group",
            f"../../../../kernel/iommu_groups/{index}",
        )
        host.char_device(f"/sys/class/vfio/{index}", 243, index)
    host.char_device("/sys/class/misc/vfio", 10, 196)
    host.pci(
        "0000:00:03.0", 0x1AE0, 0x0042, 0x020000, driver="gvnic"
    )  # the VM's NIC, also Google's vendor id
    return host


def test_v6e_behind_vfio(host: FakeHost) -> None:
    v6e_host(host)
    backend = TpuBackend(BackendContext(host_root=host.root, node_name="tpu-node"))
    found = conformance.check(backend)
    assert [d.name for d in found.devices] == [f"tpu-0000-00-{i + 4:02x}-0" for i in range(4)]
    chip = found.devices[1]
    assert (
        chip.model,
        chip.memory_bytes,
        chip.interconnect.domain if chip.interconnect else None,
    ) == ("TPU v6e", 32 * 2**30, "ici-tpu-node")
    assert [(n.path, n.major, n.minor) for n in backend.device_edits(chip).device_nodes] == [
        ("/dev/vfio/1", 243, 1)
    ]
    shared = backend.shared_edits([found.devices[0], found.devices[1]])
    assert [(n.path, n.minor) for n in shared.device_nodes] == [("/dev/vfio/vfio", 196)]
    assert "TPU_VISIBLE_CHIPS=0,1" in shared.env and "TPU_CHIPS_PER_HOST_BOUNDS=1,2,1" in shared.env


def test_v4_on_accel_nodes(host: FakeHost) -> None:
    for index in range(2):
        base = host.pci(f"0000:00:{index + 4:02x}.0", 0x1AE0, 0x005E, 0x120000, driver="tpu")
        host.file(f"/{base.relative_to(host.root)}/accel/accel{index}/.keep")
        host.char_device(f"/sys/class/accel/accel{index}", 121, index)
    found = conformance.check(TpuBackend(BackendContext(host_root=host.root, node_name="n")))
    assert [d.model for d in found.devices] == ["TPU v4", "TPU v4"]


def test_every_optional_read_may_fail(host: FakeHost) -> None:
    """The conformance property: TPUs read little beyond their identity (PCI ids, accel or VFIO
    group); what they do read, NUMA, may fail in turn without losing a chip."""
    v6e_host(host)
    host.file("/sys/devices/system/node/node0/cpulist", "0-15\n")

    def build() -> TpuBackend:
        return TpuBackend(BackendContext(host_root=host.root, node_name="tpu-node"))

    broken = faults.file_faults(host.root, lambda: build().discover())
    assert {"numa_node"} <= {label.split(" ")[2].rsplit("/", 1)[-1] for label, _ in broken}
    assert conformance.check_optional_reads(build, broken) == len(broken)


def test_a_tpu_container_gets_its_vfio_group_and_bounds(host: FakeHost, tmp_path: Path) -> None:
    """libtpu ships with the image (pip); from the host it needs the chips' VFIO groups, the
    VFIO container node and, for a subset of the host's chips, their bounds."""
    v6e_host(host)
    backend = TpuBackend(BackendContext(host_root=host.root, node_name="tpu-node"))
    seen = container.view(backend, list(backend.discover()[:2]), host.root, tmp_path / "rootfs")
    assert seen.path("/dev/vfio/0").is_file() and seen.path("/dev/vfio/vfio").is_file()
    assert "TPU_VISIBLE_CHIPS=0,1" in seen.env and "TPU_HOST_BOUNDS=1,1,1" in seen.env
