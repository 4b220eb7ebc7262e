"""NVIDIA backend: the real pynvml over a fake libnvidia-ml replaying a DGX H100 recording.

Covers discovery into the common model (NVSwitch domain, NUMA from sysfs when NVML cannot say,
MIG devices by profile and placement), CDI edits with numbers from /proc/devices and MIG
capability files, driver library mounts and hooks, Xid/ECC/lost health events, metrics, and
every error path: library or driver missing, no permission, GPU lost mid-discovery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pynvml
import pytest

from driver import conformance
from driver.backends import BackendContext
from driver.conformance import Fault
from driver.errors import BackendUnavailable, ConfigError
from support import commands, faults, nvml
from support.hosts import FakeHost
from vendors.nvidia import NvidiaBackend, capabilities, classify

BDFS = ["1b", "43", "52", "61", "9d", "c3", "d1", "df"]


def dgx_host(host: FakeHost) -> FakeHost:
    for index, bus in enumerate(BDFS):
        host.pci(
            f"0000:{bus}:00.0",
            0x10DE,
            0x2330,
            0x030200,
            numa=0 if index < 4 else 1,
            driver="nvidia",
        )
    for bus in ("05", "06", "07", "08"):
        host.pci(f"0000:{bus}:00.0", 0x10DE, 0x22A3, 0x068000, numa=0, driver="nvidia-nvswitch")
    host.proc_devices(
        {"nvidia-frontend": 195, "nvidia-nvlink": 234, "nvidia-caps": 237, "nvidia-uvm": 510}
    )
    for gi, minor in ((1, 66), (2, 75)):
        base = f"/proc/driver/nvidia/capabilities/gpu7/mig/gi{gi}"
        host.file(
            f"{base}/access",
            f"DeviceFileMinor: {minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
        )
        host.file(
            f"{base}/ci0/access",
            f"DeviceFileMinor: {minor + 1}\nDeviceFileMode: 292\nDeviceFileModify: 1\n",
        )
    for library in ("libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so"):
        host.file(f"/usr/lib/x86_64-linux-gnu/{library}.570.86.15")
    host.executable("/usr/bin/nvidia-smi", "exit 0\n")
    host.executable("/usr/bin/nvidia-cdi-hook", "exit 0\n")
    return host


@pytest.fixture
def dgx(host: FakeHost):  # type: ignore[no-untyped-def]
    dgx_host(host)
    with nvml.install(nvml.load("dgx-h100.json")) as library:
        yield NvidiaBackend(BackendContext(host_root=host.root, node_name="node-a")), library


def test_conformance(dgx) -> None:  # type: ignore[no-untyped-def]
    backend, _ = dgx
    found = conformance.check(backend)
    assert len(found.devices) == 9  # 7 whole GPUs + GPU 7's two MIG devices


def test_discovery_into_the_common_model(dgx) -> None:  # type: ignore[no-untyped-def]
    backend, _ = dgx
    devices = {d.name: d for d in backend.discover()}
    first = devices["gpu-0000-1b-00-0"]
    assert (first.vendor, first.type.value, first.model, first.architecture) == (
        "nvidia",
        "gpu",
        "NVIDIA H100 80GB HBM3",
        "hopper",
    )
    assert first.memory_bytes == 85520809984 and first.compute_units == 132
    assert (first.driver_version, first.firmware_version) == ("570.86.15", "96.00.99.00.01")
    assert (first.compute_capability, first.compute_target) == ("9.0", "sm_90")
    assert "fp8" in first.precisions and "int4" not in first.precisions
    assert first.pcie_root == "pci0000:1b" and first.numa_node == 0
    assert first.extra["gpu.nvidia.com/cudaDriverVersion"] == "12.8.0"
    domains = {d.interconnect.domain for d in devices.values() if d.interconnect}
    assert len(domains) == 1 and next(iter(domains)).startswith("nvlink-")
    assert (
        len(first.peers) == 6
    )  # the other whole GPUs on the NVSwitch fabric (GPU 7 is in MIG mode)


def test_a_media_extension_mig_profile_still_makes_a_valid_device_name(host: FakeHost) -> None:
    """NVML names profiles with media engines `MIG 1g.18gb+me`; a name is a DNS label."""
    dgx_host(host)
    recording = nvml.load("dgx-h100.json")
    mig_gpu = next(d for d in recording["devices"] if d.get("gpuInstanceProfiles"))
    mig_gpu["gpuInstanceProfiles"]["2"]["name"] = "MIG 3g.40gb+me"
    with nvml.install(recording):
        backend = NvidiaBackend(BackendContext(host_root=host.root, node_name="node-a"))
        found = conformance.check(backend)  # validates every name as the API server would
    migs = sorted(d.name for d in found.devices if d.partition_profile)
    assert migs[0].startswith("gpu-0000-df-00-0-mig-3g40gbme-")
    assert {d.partition_profile for d in found.devices if d.partition_profile} == {"3g.40gb+me"}


def test_mig_mode_gpu_is_published_as_its_mig_devices(dgx) -> None:  # type: ignore[no-untyped-def]
    backend, _ = dgx
    devices = {d.name: d for d in backend.discover()}
    assert "gpu-0000-df-00-0" not in devices
    mig = devices["gpu-0000-df-00-0-mig-3g40gb-4"]
    assert mig.partition_profile == "3g.40gb" and mig.uuid.startswith("MIG-")
    assert mig.parent_uuid and mig.memory_bytes == 42412802048 and mig.compute_units == 60
    assert mig.numa_node == 1  # NVML said NotSupported: read from sysfs
    nodes = [(n.path, n.major, n.minor) for n in backend.device_edits(mig).device_nodes]
    assert nodes == [
        ("/dev/nvidia7", 195, 7),
        ("/dev/nvidia-caps/nvidia-cap75", 237, 75),
        ("/dev/nvidia-caps/nvidia-cap76", 237, 76),
    ]


def test_missing_driver_files_are_one_error_that_names_the_remedy(
    dgx, host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    backend, _ = dgx
    for library in (host.root / "usr/lib/x86_64-linux-gnu").glob("libcuda.so*"):
        library.unlink()
    devices = backend.discover()
    with caplog.at_level(logging.WARNING, logger="vendors.nvidia"):
        backend.shared_edits(devices[:1])
        backend.discover()  # a rediscovery looks again: still missing, not said again
        backend.shared_edits(devices[1:2])
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "--backend-option nvidia.driver-root=<dir>" in error.getMessage()
    assert "libcuda.so.1" in error.missing  # type: ignore[attr-defined]


def test_cdi_edits_for_the_node_and_driver_files(dgx) -> None:  # type: ignore[no-untyped-def]
    backend, _ = dgx
    devices = backend.discover()
    assert [(n.path, n.major, n.minor) for n in backend.device_edits(devices[2]).device_nodes] == [
        ("/dev/nvidia2", 195, 2)
    ]
    shared = backend.shared_edits(devices[:2])
    assert [(n.path, n.major, n.minor) for n in shared.device_nodes] == [
        ("/dev/nvidiactl", 195, 255),
        ("/dev/nvidia-uvm", 510, 0),
        ("/dev/nvidia-uvm-tools", 510, 1),
    ]
    assert shared.env == ("NVIDIA_VISIBLE_DEVICES=void",)
    mounted = {m.container_path for m in shared.mounts}
    assert (
        "/usr/lib/x86_64-linux-gnu/libcuda.so.570.86.15" in mounted
        and "/usr/bin/nvidia-smi" in mounted
    )
    # With nvidia-cdi-hook on the host, the hook makes the sonames and refreshes the loader cache.
    folder = "/usr/lib/x86_64-linux-gnu"
    assert [h.args for h in shared.hooks] == [
        (
            "nvidia-cdi-hook",
            "create-symlinks",
            "--link",
            f"libcuda.so.570.86.15::{folder}/libcuda.so.1",
            "--link",
            f"libcuda.so.1::{folder}/libcuda.so",
            "--link",
            f"libnvidia-ml.so.570.86.15::{folder}/libnvidia-ml.so.1",
            "--link",
            f"libnvidia-ptxjitcompiler.so.570.86.15::{folder}/libnvidia-ptxjitcompiler.so.1",
        ),
        ("nvidia-cdi-hook", "update-ldcache", "--folder", folder),
    ]
    assert backend.driver_files().missing() == ["libnvidia-nvvm.so.4"]


def test_health_events_from_nvml(dgx) -> None:  # type: ignore[no-untyped-def]
    backend, library = dgx
    backend.discover()
    stop = threading.Event()
    events = backend.health_events(stop)
    library.emit(0, pynvml.nvmlEventTypeXidCriticalError, 79)
    library.emit(1, pynvml.nvmlEventTypeXidCriticalError, 13)
    library.emit(2, pynvml.nvmlEventTypeDoubleBitEccError)
    received = []
    for event in events:
        if event.kind in ("lost", "application-error", "ecc-uncorrectable"):
            received.append((event.device, event.kind, event.code, event.healthy))
        if len(received) == 3:
            break
    assert received == [
        ("gpu-0000-1b-00-0", "lost", "79", False),
        ("gpu-0000-43-00-0", "application-error", "13", True),
        ("gpu-0000-52-00-0", "ecc-uncorrectable", "dbe", False),
    ]
    library.lose_gpu(3)
    lost = next(e for e in events if e.kind == "lost")
    assert lost.device == "gpu-0000-61-00-0"
    stop.set()
    events.close()
    assert (
        library.registered[0]
        == pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError
    )


@pytest.mark.parametrize(
    ("xid", "kind", "healthy"),
    [
        (13, "application-error", True),
        (31, "application-error", True),
        (109, "application-error", True),
        (48, "ecc-uncorrectable", False),
        (79, "lost", False),
        (119, "xid", False),
    ],
)
def test_xid_classification(xid: int, kind: str, healthy: bool) -> None:
    event = classify(pynvml.nvmlEventTypeXidCriticalError, xid, "gpu-x", pynvml)
    assert event is not None and (event.kind, event.healthy) == (kind, healthy)


def test_extra_ignored_xids_are_configurable() -> None:
    event = classify(pynvml.nvmlEventTypeXidCriticalError, 119, "gpu-x", pynvml, frozenset({119}))
    assert event is not None and event.healthy


def test_a_malformed_ignore_xids_option_is_a_config_error(host: FakeHost) -> None:
    with (
        nvml.install(nvml.load("dgx-h100.json")),
        pytest.raises(ConfigError, match=r"nvidia\.ignore-xids=79,x: expected Xid numbers"),
    ):
        NvidiaBackend(BackendContext(host_root=host.root, options={"ignore-xids": "79,x"}))


def test_metrics_sample(dgx) -> None:  # type: ignore[no-untyped-def]
    backend, _ = dgx
    backend.discover()
    sample = next(s for s in backend.sample() if s.device == "gpu-0000-1b-00-0")
    assert sample.utilization == pytest.approx(0.37)
    assert sample.power_watts == pytest.approx(412.345) and sample.energy_joules == pytest.approx(
        98765.432
    )
    assert (sample.temperature_celsius, sample.errors_corrected, sample.errors_uncorrected) == (
        61.0,
        2,
        0,
    )
    assert sample.memory_limit_bytes == 85520809984


@pytest.mark.parametrize(
    ("init_error", "reason"),
    [
        ("LibraryNotFound", "NVML (libnvidia-ml.so.1) not found"),
        ("DriverNotLoaded", "the NVIDIA kernel driver is not loaded"),
        ("NoPermission", "no permission to open the NVIDIA devices"),
    ],
)
def test_missing_library_driver_or_permission_is_one_line(
    host: FakeHost, init_error: str, reason: str
) -> None:
    with (
        nvml.install(nvml.load("dgx-h100.json"), init_error=init_error),
        pytest.raises(BackendUnavailable) as caught,
    ):
        NvidiaBackend(BackendContext(host_root=host.root))
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_library_really_absent_on_this_machine(host: FakeHost) -> None:
    """No fake installed: pynvml tries the real libnvidia-ml.so.1, which this machine lacks."""
    with pytest.raises(BackendUnavailable, match=r"libnvidia-ml\.so\.1"):
        NvidiaBackend(BackendContext(host_root=host.root))


def test_a_gpu_lost_mid_discovery_is_published_unhealthy_not_hidden(host: FakeHost) -> None:
    dgx_host(host)
    recording = nvml.load("dgx-h100.json")
    recording["devices"][4]["handle"] = {"error": "GpuIsLost"}  # NVML cannot even open it
    recording["devices"][5]["memory"] = {"error": "GpuIsLost"}  # it falls off mid-discovery
    host.file(
        "/proc/driver/nvidia/gpus/0000:9d:00.0/information",
        "Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t GPU-3f1b3c2e-4d5a-6b7c-8d9e-0f1a2b3c4d5e\n"
        "Device Minor: \t 4\nGPU Excluded:\t No\n",
    )
    with nvml.install(recording):
        backend = NvidiaBackend(BackendContext(host_root=host.root))
        devices = {d.name: d for d in backend.discover()}
        assert len(devices) == 9  # nothing hidden
        swept = devices["gpu-0000-9d-00-0"]  # named by the kernel driver's /proc entry
        assert (swept.uuid, swept.model, swept.index) == (
            "GPU-3f1b3c2e-4d5a-6b7c-8d9e-0f1a2b3c4d5e",
            "NVIDIA H100 80GB HBM3",
            None,
        )
        fell = devices["gpu-0000-c3-00-0"]
        assert fell.uuid.startswith("GPU-") and fell.memory_bytes is None
        for name in ("gpu-0000-9d-00-0", "gpu-0000-c3-00-0"):
            with pytest.raises(BackendUnavailable, match="cannot be used"):
                backend.device_edits(devices[name])
        stop = threading.Event()
        events = backend.health_events(stop)
        lost = [next(events), next(events)]
        stop.set()
        events.close()
    assert sorted((e.device, e.kind, e.healthy) for e in lost) == [
        ("gpu-0000-9d-00-0", "lost", False),
        ("gpu-0000-c3-00-0", "lost", False),
    ]
    assert "GPU is lost" in lost[0].message or "does not list it" in lost[0].message


def test_an_excluded_gpu_is_not_reported_lost(host: FakeHost) -> None:
    dgx_host(host)
    recording = nvml.load("dgx-h100.json")
    recording["devices"][4]["handle"] = {"error": "GpuIsLost"}
    host.file("/proc/driver/nvidia/gpus/0000:9d:00.0/information", "GPU Excluded:\t Yes\n")
    with nvml.install(recording):
        names = [d.name for d in NvidiaBackend(BackendContext(host_root=host.root)).discover()]
    assert "gpu-0000-9d-00-0" not in names and len(names) == 8


def test_unknown_numa_is_not_published_as_minus_one(host: FakeHost) -> None:
    dgx_host(host)
    host.file("/sys/devices/pci0000:df/0000:df:01.0/0000:df:00.0/numa_node", "-1\n")
    recording = nvml.load("dgx-h100.json")
    with nvml.install(recording):
        devices = NvidiaBackend(BackendContext(host_root=host.root)).discover()
    assert {d.numa_node for d in devices if d.name.startswith("gpu-0000-df")} == {None}


def test_fabric_clique_names_the_domain(host: FakeHost) -> None:
    dgx_host(host)
    recording = nvml.load("dgx-h100.json")
    for device in recording["devices"]:
        device["fabric"] = {
            "clusterUuid": "5f1c0a9e2b7d4c3e8a6f1b2c3d4e5f60",
            "status": 0,
            "cliqueId": 3,
            "state": 3,
        }
    with nvml.install(recording):
        devices = NvidiaBackend(BackendContext(host_root=host.root)).discover()
    assert {d.interconnect.domain for d in devices if d.interconnect} == {
        "5f1c0a9e-2b7d-4c3e-8a6f-1b2c3d4e5f60.3"
    }


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((7, 0), {"fp64", "fp32", "fp16", "int8"}),
        ((8, 0), {"fp64", "fp32", "fp16", "int8", "int4", "tf32", "bf16"}),
        ((10, 0), {"fp64", "fp32", "fp16", "int8", "tf32", "bf16", "fp8", "fp4"}),
    ],
)
def test_precisions_by_compute_capability(capability: tuple[int, int], expected: set[str]) -> None:
    assert capabilities.precisions(capability) == expected


@pytest.mark.parametrize(
    ("slices", "mib", "name"),
    [(1, 9984, "1g.10gb"), (1, 20096, "1g.20gb"), (3, 40448, "3g.40gb"), (7, 81152, "7g.80gb")],
)
def test_mig_profile_names(slices: int, mib: int, name: str) -> None:
    assert capabilities.mig_profile_name(slices, mib, 85520809984) == name


def test_the_smoke_recorder_writes_what_the_fake_replays(host: FakeHost) -> None:
    """hack/smoke-nvidia records NVML through the same pynvml calls; run against the fake, it reproduces the fixture."""
    smoke = commands.hack_script("smoke.py")
    original = nvml.load("dgx-h100.json")
    with nvml.install(original):
        recorded = smoke.record_nvidia(host.root)
    assert recorded["system"]["driverVersion"] == original["system"]["driverVersion"]
    for mine, theirs in zip(recorded["devices"], original["devices"], strict=True):
        for key in (
            "uuid",
            "name",
            "minor",
            "busId",
            "memory",
            "cudaComputeCapability",
            "numaNode",
            "migMode",
            "nvlinks",
        ):
            assert mine[key] == theirs[key], key
        assert mine.get("migDevices", []) == [
            {k: v for k, v in m.items() if k != "profileId"} for m in theirs.get("migDevices", [])
        ]
    with nvml.install(recorded):  # and the recording replays into the same devices
        replayed = NvidiaBackend(BackendContext(host_root=dgx_host(host).root)).discover()
    assert len(replayed) == 9


# What names a GPU (and a MIG device): the only NVML calls a device may be skipped for.
NVML_IDENTITY = {
    "nvmlInitWithFlags",
    "nvmlShutdown",
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetMinorNumber",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId",
    "nvmlDeviceGetGpuInstanceById",
    "nvmlGpuInstanceGetInfo",
}


def nvml_faults(library: nvml.FakeNvmlLibrary, discover: Callable[[], object]) -> list[Fault]:
    """Every non-identity NVML call discovery makes, failing with NotSupported, Unknown, NoPermission."""
    library.calls.clear()
    discover()

    def install(call: str, error: str) -> Callable[[], None]:
        library.failing[call] = error
        return lambda: library.failing.pop(call)

    return faults.library_faults(
        sorted(set(library.calls) - NVML_IDENTITY), faults.NVML_ERRORS, install
    )


def test_every_optional_read_may_fail(host: FakeHost) -> None:
    """The conformance property on the DGX recording: each non-identity NVML call and file read
    failing in turn loses no GPU and no MIG device, and the slices still validate."""
    dgx_host(host)
    with nvml.install(nvml.load("dgx-h100.json")) as library:

        def build() -> NvidiaBackend:
            context = BackendContext(host_root=host.root, node_name="node-a")
            return NvidiaBackend(context, cuda=nvml.FakeCuda({}))  # no CUDA: NVML's count

        broken = nvml_faults(library, lambda: build().discover())
        broken += faults.file_faults(host.root, lambda: build().discover())
        assert {label.split(" ")[0] for label, _ in broken} >= {
            "nvmlDeviceGetAttributes_v2",
            "nvmlDeviceGetMigMode",
            "nvmlDeviceGetNumaNodeId",
            "12",  # x numa_node: eight GPUs and four NVSwitches
        }
        assert conformance.check_optional_reads(build, broken) == len(broken)


def test_a_failed_read_is_logged_once_per_device_with_the_call_and_error(
    host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    dgx_host(host)
    with nvml.install(nvml.load("dgx-h100.json")) as library:
        library.failing["nvmlDeviceGetVbiosVersion"] = "NoPermission"
        backend = NvidiaBackend(BackendContext(host_root=host.root))
        caplog.set_level(logging.WARNING, logger="vendors.nvidia")
        backend.discover()
        backend.discover()  # rediscovery does not repeat it
    logged = [
        (r.__dict__["device"], r.__dict__["error"])
        for r in caplog.records
        if r.__dict__.get("call") == "nvmlDeviceGetVbiosVersion"
    ]
    assert len(logged) == 8 and len({device for device, _ in logged}) == 8
    assert logged[0] == ("0000:1b:00.0", "NVMLError_NoPermission: Insufficient Permissions")


def test_mig_mode_unreadable_still_finds_the_mig_devices(dgx) -> None:  # type: ignore[no-untyped-def]
    backend, library = dgx
    library.failing["nvmlDeviceGetMigMode"] = "Unknown"
    library.failing["nvmlDeviceGetAttributes_v2"] = "NotSupported"
    devices = {d.name: d for d in backend.discover()}
    mig = devices["gpu-0000-df-00-0-mig-3g40gb-4"]  # profile from the GPU instance profile
    assert mig.compute_units == 60 and mig.partition_profile == "3g.40gb"
    assert "gpu-0000-df-00-0" not in devices
