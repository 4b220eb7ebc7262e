"""AMD backend: amdsmi (a fake replaying an MI300X recording) and the sysfs/KFD fallback.

Covers the common model with the xGMI hive as interconnect domain, CPX partitions as devices,
DRM and KFD device numbers from sysfs, ECC, reset and thermal health events, metrics from sysfs, and the error
paths: amdsmi missing (KeyError at import, as the real one raises) falls back to sysfs, and no
amdgpu driver at all is a one-line reason.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from driver import conformance
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from driver.model import HealthEvent
from support import amdsmi_fake, container, faults
from support.hosts import FakeHost
from vendors.amd import AmdBackend

BUSES = ["05", "26", "46", "65", "85", "a6", "c6", "e5"]


def mi300x_host(host: FakeHost, cpx: bool = False) -> FakeHost:
    host.file("/sys/module/amdgpu/version", "6.10.5\n")
    host.char_device("/sys/class/kfd/kfd", 235, 0)
    for index, bus in enumerate(BUSES):
        base = host.pci(
            f"0000:{bus}:00.0",
            0x1002,
            0x74A1,
            0x120000,
            numa=0 if index < 4 else 1,
            driver="amdgpu",
        )
        sysfs = f"/{base.relative_to(host.root)}"
        card, render = index + 1, 128 + index
        host.char_device(f"/sys/class/drm/card{card}", 226, card)
        host.char_device(f"/sys/class/drm/renderD{render}", 226, render)
        host.file(f"{sysfs}/drm/card{card}/.keep")
        host.file(f"{sysfs}/drm/renderD{render}/.keep")
        host.file(f"{sysfs}/product_name", "AMD Instinct MI300X OAM\n")
        host.file(f"{sysfs}/vbios_version", "113-M3000100-103\n")
        host.file(f"{sysfs}/xgmi_hive_info/xgmi_hive_id", "5561394133483653137\n")
        host.file(f"{sysfs}/current_compute_partition", "SPX\n")
        host.file(f"{sysfs}/ras/umc_err_count", "ue: 0\nce: 3\n")
        host.file(f"{sysfs}/gpu_busy_percent", "42\n" if index == 0 else "0\n")
        host.file(f"{sysfs}/mem_info_vram_used", "1073741824\n")
        host.file(f"{sysfs}/hwmon/hwmon{index}/power1_average", "551000000\n")
        host.file(f"{sysfs}/hwmon/hwmon{index}/temp1_input", "47000\n")
        node = f"/sys/class/kfd/kfd/topology/nodes/{index + 2}"
        host.file(
            f"{node}/properties",
            "simd_count 1216\nsimd_per_cu 4\ngfx_target_version 90402\n"
            f"drm_render_minor {render}\nunique_id {0xA1B2C3D400 + index}\n",
        )
        host.file(f"{node}/mem_banks/0/properties", "heap_type 1\nsize_in_bytes 206141652992\n")
    host.file(
        "/sys/class/kfd/kfd/topology/nodes/0/properties", "simd_count 0\ndrm_render_minor 0\n"
    )
    if cpx:
        for partition in range(16):
            host.char_device(f"/sys/class/drm/card{1 + partition}", 226, 1 + partition)
            host.char_device(f"/sys/class/drm/renderD{128 + partition}", 226, 128 + partition)
    return host


def test_conformance_with_amdsmi(host: FakeHost) -> None:
    mi300x_host(host)
    with amdsmi_fake.install(amdsmi_fake.load("mi300x.json")):
        backend = AmdBackend(BackendContext(host_root=host.root))
        assert backend.source == "amdsmi"
        found = conformance.check(backend)
    assert len(found.devices) == 8


def test_amdsmi_discovery(host: FakeHost) -> None:
    mi300x_host(host)
    with amdsmi_fake.install(amdsmi_fake.load("mi300x.json")):
        backend = AmdBackend(BackendContext(host_root=host.root))
        devices = {d.name: d for d in backend.discover()}
        first = devices["gpu-0000-05-00-0"]
        assert (first.model, first.architecture, first.compute_target) == (
            "AMD Instinct MI300X",
            "cdna3",
            "gfx942",
        )
        assert first.memory_bytes == 196592 * 2**20 and first.compute_units == 304
        assert "fp8" in first.precisions and first.numa_node == 0
        assert first.interconnect is not None and first.interconnect.technology == "xgmi"
        assert first.interconnect.domain == "xgmi-hive-0x4d2f5a10c3b7e811" and len(first.peers) == 7
        edits = backend.device_edits(first)
        assert [(n.path, n.major, n.minor) for n in edits.device_nodes] == [
            ("/dev/dri/card1", 226, 1),
            ("/dev/dri/renderD128", 226, 128),
        ]
        assert [(n.path, n.major, n.minor) for n in backend.shared_edits([first]).device_nodes] == [
            ("/dev/kfd", 235, 0)
        ]


def test_cpx_partitions_are_devices_of_their_own(host: FakeHost) -> None:
    mi300x_host(host, cpx=True)
    with amdsmi_fake.install(amdsmi_fake.load("mi300x-cpx.json")):
        backend = AmdBackend(BackendContext(host_root=host.root))
        found = conformance.check(backend)
    names = [d.name for d in found.devices]
    assert (
        len(names) == 16 and "gpu-0000-05-00-0-cpx-7" in names and "gpu-0000-26-00-0-cpx-0" in names
    )
    partition = found.get("gpu-0000-05-00-0-cpx-3")
    assert (
        partition is not None
        and partition.partition_profile == "cpx"
        and partition.compute_units == 38
    )


def test_missing_amdsmi_falls_back_to_sysfs(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    mi300x_host(host)

    class Unloadable:
        """What `import amdsmi` does without libamd_smi.so: print two lines, then raise KeyError."""

        def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
            if name == "amdsmi":
                print("libamd_smi.so: cannot open shared object file")
                raise KeyError("libamd_smi.so")
            return None

    monkeypatch.delitem(sys.modules, "amdsmi", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Unloadable(), *sys.meta_path])
    backend = AmdBackend(BackendContext(host_root=host.root))
    assert backend.source == "sysfs"
    found = conformance.check(backend)
    first = found.get("gpu-0000-05-00-0")
    assert first is not None
    assert (first.model, first.compute_target, first.compute_units) == (
        "AMD Instinct MI300X OAM",
        "gfx942",
        304,
    )
    assert first.memory_bytes == 206141652992 and first.uuid == f"{0xA1B2C3D400:016x}"
    assert first.interconnect is not None and len(first.peers) == 7
    assert first.driver_version == "6.10.5" and first.firmware_version == "113-M3000100-103"


def test_no_amdgpu_driver_is_one_line(host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    import vendors.amd

    monkeypatch.setattr(vendors.amd, "_import_amdsmi", lambda: None)
    with pytest.raises(BackendUnavailable, match="the amdgpu kernel driver is not loaded"):
        AmdBackend(BackendContext(host_root=host.root))


def test_amdsmi_that_cannot_start_falls_back_to_sysfs(host: FakeHost) -> None:
    mi300x_host(host)
    with amdsmi_fake.install(amdsmi_fake.load("mi300x.json"), init_error=34):  # DRIVER_NOT_LOADED
        backend = AmdBackend(BackendContext(host_root=host.root))
    assert backend.source == "sysfs" and len(backend.discover()) == 8


@pytest.fixture
def monitored(
    host: FakeHost,
) -> Iterator[tuple[types.ModuleType, Iterator[HealthEvent], threading.Event]]:
    """amdsmi's fake, and the health events of a backend on it; stop the event when done."""
    mi300x_host(host)
    with amdsmi_fake.install(amdsmi_fake.load("mi300x.json")) as fake:
        backend = AmdBackend(BackendContext(host_root=host.root, options={"poll-seconds": "0.02"}))
        backend.discover()
        stop = threading.Event()
        yield fake, backend.health_events(stop), stop
        stop.set()


def test_new_uncorrectable_ecc_errors_are_health_events(monitored) -> None:  # type: ignore[no-untyped-def]
    fake, events, _ = monitored
    fake.state["recording"]["processors"][2]["ecc"]["uncorrectable_count"] = 3
    event = next(events)
    assert (event.device, event.kind, event.code) == ("gpu-0000-46-00-0", "ecc-uncorrectable", "3")


def test_resets_and_thermal_throttling_are_health_events(monitored) -> None:  # type: ignore[no-untyped-def]
    fake, events, stop = monitored
    fake.notify(1, "GPU_PRE_RESET", "reset scheduled")
    fake.notify(1, "GPU_POST_RESET", "")
    fake.notify(4, "THERMAL_THROTTLE", "throttled at 105 C")
    fake.notify(4, "VMFAULT", "page fault at 0x7f00")
    seen = [next(events) for _ in range(4)]
    stop.set()
    assert list(events) == []  # the loop ends once stopped
    assert [(e.device, e.kind, e.code, e.healthy) for e in seen] == [
        ("gpu-0000-26-00-0", "device-status", "reset", False),
        ("gpu-0000-26-00-0", "recovered", "reset", True),
        ("gpu-0000-85-00-0", "overheating", "thermal-throttle", False),
        ("gpu-0000-85-00-0", "application-error", "vm-fault", True),
    ]
    assert seen[0].message == "amdsmi: reset scheduled" and seen[1].message == "amdsmi: reset"
    assert fake.state["listening"] == {}  # readers are stopped on the way out


def test_metrics_from_sysfs(host: FakeHost) -> None:
    mi300x_host(host)
    with amdsmi_fake.install(amdsmi_fake.load("mi300x.json")):
        backend = AmdBackend(BackendContext(host_root=host.root))
        backend.discover()
        sample = next(s for s in backend.sample() if s.device == "gpu-0000-05-00-0")
    assert (
        sample.utilization,
        sample.memory_used_bytes,
        sample.power_watts,
        sample.temperature_celsius,
    ) == (0.42, 1073741824, 551.0, 47.0)


@pytest.mark.parametrize(
    ("sensors", "celsius"),
    [
        ({"temp1": ("edge", "47000"), "temp2": ("junction", "61000")}, 47.0),
        # MI300-class: no edge sensor, so the junction (hotspot) one; never the memory's.
        ({"temp2": ("junction", "61000"), "temp3": ("mem", "52000")}, 61.0),
        ({"temp3": ("mem", "52000")}, None),
    ],
)
def test_the_die_temperature_is_the_edge_sensor_else_the_junction(
    host: FakeHost, sensors: dict[str, tuple[str, str]], celsius: float | None
) -> None:
    mi300x_host(host)
    hwmon = host.root / "sys/bus/pci/devices/0000:05:00.0/hwmon/hwmon0"
    (hwmon / "temp1_input").unlink()
    for name, (label, millidegrees) in sensors.items():
        (hwmon / f"{name}_label").write_text(f"{label}\n")
        (hwmon / f"{name}_input").write_text(f"{millidegrees}\n")
    with amdsmi_fake.install(amdsmi_fake.load("mi300x.json")):
        backend = AmdBackend(BackendContext(host_root=host.root))
        backend.discover()
        sample = next(s for s in backend.sample() if s.device == "gpu-0000-05-00-0")
    assert sample.temperature_celsius == celsius


def test_an_unreadable_ecc_count_costs_only_that_figure(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vendors.amd

    mi300x_host(host)
    host.file("/sys/bus/pci/devices/0000:05:00.0/ras/umc_err_count", "ue: N/A\nce: 3\n")
    with amdsmi_fake.install(amdsmi_fake.load("mi300x.json")) as fake:
        fake.state["recording"]["processors"][1]["ecc"] = {"uncorrectable_count": "garbage"}
        backend = AmdBackend(BackendContext(host_root=host.root))
        backend.discover()
        through_amdsmi = {s.device: s.errors_uncorrected for s in backend.sample()}
    monkeypatch.setattr(vendors.amd, "_import_amdsmi", lambda: None)
    backend = AmdBackend(BackendContext(host_root=host.root))
    backend.discover()
    through_sysfs = {s.device: s.errors_uncorrected for s in backend.sample()}
    assert len(through_amdsmi) == len(through_sysfs) == 8
    assert through_amdsmi["gpu-0000-26-00-0"] is None and through_amdsmi["gpu-0000-05-00-0"] == 0
    assert through_sysfs["gpu-0000-05-00-0"] is None and through_sysfs["gpu-0000-26-00-0"] == 0


# amdsmi calls that name a GPU: its PCI address (the render node falls back to sysfs).
AMDSMI_IDENTITY = {"bdf"}
# amdsmi status codes: NOT_SUPPORTED, NO_PERM, UNKNOWN_ERROR.
AMDSMI_ERRORS = ("2", "10", "4294967295")


@pytest.mark.parametrize("mode", ["spx", "cpx"])
def test_every_optional_read_may_fail_with_amdsmi(host: FakeHost, mode: str) -> None:
    """The conformance property: each amdsmi call (but the PCI address) and each sysfs/KFD file
    failing in turn for every GPU loses no GPU; in CPX mode, no compute partition either (they
    share their GPU's PCI address)."""
    mi300x_host(host, cpx=mode == "cpx")
    recording = "mi300x-cpx.json" if mode == "cpx" else "mi300x.json"
    with amdsmi_fake.install(amdsmi_fake.load(recording)) as fake:
        processors = fake.state["recording"]["processors"]

        def build() -> AmdBackend:
            return AmdBackend(BackendContext(host_root=host.root))

        def install(key: str, code: str) -> Callable[[], None]:
            saved = [dict(p) for p in processors]
            for processor in processors:
                processor[key] = {"error": int(code)}
            return lambda: [p.update(s) for p, s in zip(processors, saved, strict=True)]  # type: ignore[func-returns-value]

        keys = sorted(set(processors[0]) - AMDSMI_IDENTITY)
        broken = faults.library_faults(keys, AMDSMI_ERRORS, install)
        broken += faults.file_faults(host.root, lambda: build().discover())
        assert len(broken) > 40
        assert conformance.check_optional_reads(build, broken) == len(broken)


def test_every_optional_read_may_fail_with_sysfs_alone(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vendors.amd

    mi300x_host(host)
    monkeypatch.setattr(vendors.amd, "_import_amdsmi", lambda: None)

    def build() -> AmdBackend:
        return AmdBackend(BackendContext(host_root=host.root))

    broken = faults.file_faults(host.root, lambda: build().discover())
    assert {"product_name", "properties", "vbios_version"} <= {
        label.split(" ")[2].rsplit("/", 1)[-1] for label, _ in broken
    }
    assert conformance.check_optional_reads(build, broken) == len(broken)


def test_a_rocm_container_gets_kfd_and_the_render_node(host: FakeHost, tmp_path: Path) -> None:
    """ROCm's user space (libamdhip64.so, libhsa-runtime64.so) ships with the image and must
    match it, not the host; from the host it needs /dev/kfd and the GPU's DRM nodes, which the
    claim gives, and no host library."""
    mi300x_host(host)
    with amdsmi_fake.install(amdsmi_fake.load("mi300x.json")):
        backend = AmdBackend(BackendContext(host_root=host.root))
        spec = container.claim_spec(backend, list(backend.discover()[:1]))
    seen = container.resolve(spec, host.root, tmp_path / "rootfs")
    for node in ("/dev/kfd", "/dev/dri/renderD128", "/dev/dri/card1"):
        assert seen.path(node).is_file(), node
    assert not spec["containerEdits"].get("mounts") and seen.other_hooks == []
