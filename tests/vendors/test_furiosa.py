"""FuriosaAI backend: furiosa-smi (a fake replaying two RNGD cards), real device nodes, core-range partitions."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from driver import conformance, inventory
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from support import container, faults, furiosa_fake
from support.hosts import FakeHost
from vendors.furiosa import FuriosaBackend


@pytest.fixture
def cards(host: FakeHost):  # type: ignore[no-untyped-def]
    for index, bus in enumerate(("17", "2a")):
        host.pci(f"0000:{bus}:00.0", 0x1ED2, 0x0001, 0x120000, numa=0, driver="rngd")
        for minor, path in enumerate(furiosa_fake.device_files(index)):
            host.char_node(path, 508, index * 64 + minor)
    with furiosa_fake.install(furiosa_fake.load("rngd.json")) as smi:
        yield (
            FuriosaBackend(BackendContext(host_root=host.root, options={"poll-seconds": "0.01"})),
            smi,
        )


def test_conformance_and_discovery(cards) -> None:  # type: ignore[no-untyped-def]
    backend, _ = cards
    found = conformance.check(backend)
    first = found.devices[0]
    assert (first.name, first.model, first.architecture, first.compute_units) == (
        "npu-0000-17-00-0",
        "FuriosaAI RNGD",
        "rngd",
        8,
    )
    assert first.memory_bytes == 48 * 2**30 and first.driver_version == "2025.2.0"
    nodes = backend.device_edits(first).device_nodes
    assert (
        len(nodes) == 35
        and nodes[0].path == "/dev/rngd/npu0mgmt"
        and (nodes[0].major, nodes[0].minor) == (508, 0)
    )


def test_core_range_partitions_keep_only_their_pe_nodes(cards) -> None:  # type: ignore[no-untyped-def]
    backend, _ = cards
    found = inventory.discover([backend], partitions=True)
    assert len(found.partitions) == 2 * (8 + 4 + 2)
    half = found.partitions["npu-0000-17-00-0-4pe-4"]
    assert half.profile == "4pe.24gb" and half.memory_bytes == 24 * 2**30
    pes = [
        n.path.rsplit("/", 1)[1]
        for n in backend.partition_edits(half).device_nodes
        if "pe" in n.path
    ]
    assert pes == [
        "npu0pe4",
        "npu0pe5",
        "npu0pe6",
        "npu0pe7",
        "npu0pe4-5",
        "npu0pe6-7",
        "npu0pe4-7",
    ]
    two = found.partitions["npu-0000-17-00-0-2pe-2"]
    assert {n.path for n in backend.partition_edits(two).device_nodes} >= {
        "/dev/rngd/npu0mgmt",
        "/dev/rngd/npu0ch3",
        "/dev/rngd/npu0pe2-3",
    }


def test_liveness_loss_and_return(cards) -> None:  # type: ignore[no-untyped-def]
    backend, smi = cards
    backend.discover()
    stop = threading.Event()
    events = backend.health_events(stop)
    smi.recording["devices"][1]["gone"] = True
    lost = next(events)
    smi.recording["devices"][1]["gone"] = False
    back = next(events)
    stop.set()
    assert (lost.device, lost.kind, lost.healthy) == ("npu-0000-2a-00-0", "lost", False)
    assert back.healthy


def test_missing_library_is_one_line(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(
        sys.modules, "furiosa_smi", None
    )  # what an uninstalled package looks like to import
    with pytest.raises(
        BackendUnavailable, match=r"furiosa-smi is not installed: pip install 'unidra\[furiosa\]'"
    ):
        FuriosaBackend(BackendContext(host_root=host.root))


# furiosa-smi calls that name an NPU: its PCI address and device files.
SMI_IDENTITY = {"bdf", "device_files"}
SMI_ERRORS = ("DeviceNotAvailableError", "IoError", "UnexpectedValueError")


def test_every_optional_read_may_fail(cards, host: FakeHost) -> None:  # type: ignore[no-untyped-def]
    """The conformance property: each furiosa-smi call but the identity ones raising, and each
    sysfs file failing, in turn loses no NPU."""
    _, smi = cards
    recording = smi.recording

    def build() -> FuriosaBackend:
        return FuriosaBackend(BackendContext(host_root=host.root))

    def install(key: str, error: str) -> Callable[[], None]:
        owners = [recording] if key == "driver" else recording["devices"]
        saved = [owner[key] for owner in owners]
        for owner in owners:
            owner[key] = {"error": error}

        def undo() -> None:
            for owner, value in zip(owners, saved, strict=True):
                owner[key] = value

        return undo

    calls = {
        "uuid",
        "arch",
        "product_name",
        "core_num",
        "numa_node",
        "dev_node_index",
        "firmware_version",
        "memory",
        "driver",
    }
    broken = faults.library_faults(sorted(calls - SMI_IDENTITY), SMI_ERRORS, install)
    broken += faults.file_faults(host.root, lambda: build().discover())
    assert conformance.check_optional_reads(build, broken) == len(broken)


def test_a_library_without_an_optional_call_loses_no_npu(
    cards, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """An older or newer furiosa-smi may lack a call: that is a failed optional read too."""
    backend, _ = cards
    for call in ("firmware_version", "numa_node", "memory_usage", "device_temperature"):
        monkeypatch.delattr(furiosa_fake.FakeDevice, call)
    devices = backend.discover()
    assert [d.name for d in devices] == ["npu-0000-17-00-0", "npu-0000-2a-00-0"]
    assert [s.device for s in backend.sample()] == [d.name for d in devices]


def test_a_furiosa_container_gets_every_card_node(cards, host: FakeHost, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The Furiosa runtime ships with the image and talks to the card through its /dev/rngd
    nodes alone; no host library is mounted."""
    backend, _ = cards
    spec = container.claim_spec(backend, list(backend.discover()[:1]))
    seen = container.resolve(spec, host.root, tmp_path / "rootfs")
    assert all(seen.path(path).is_file() for path in furiosa_fake.device_files(0))
    assert not spec.get("containerEdits", {}).get("mounts")
