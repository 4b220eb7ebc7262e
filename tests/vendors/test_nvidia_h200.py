"""The NVIDIA backend on a real H200's answers (tests/fixtures/nvidia/h200, recorded on the host).

Before these changes this replay listed no GPU at all: NVML answers NotSupported to
nvmlDeviceGetAttributes for a whole GPU. Covers `unidra inspect` through the CLI, the SM count
from CUDA or NVML's core count, NUMA only when known, the MIG profiles NVML offers with MIG off,
the slice against the one published on the host, a CUDA container's view of the claim's CDI
spec (with and without nvidia-cdi-hook, and under a GPU-operator driver root), and every
optional read failing in turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driver import cli, conformance, slices
from driver.backends import BackendContext
from driver.errors import ConfigError
from support import commands, container, faults, nvml
from support.hosts import FakeHost
from vendors.nvidia import NvidiaBackend, driver_files
from vendors.nvidia.cuda import CudaDriver, CudaError

BDF = nvml.H200_BDF
NAME = "gpu-0000-00-06-0"
SONAMES = (
    "libcuda.so.1",
    "libnvidia-ml.so.1",
    "libnvidia-ptxjitcompiler.so.1",
    "libnvidia-nvvm.so.4",
    "libnvidia-opencl.so.1",
)


@pytest.fixture
def h200(host: FakeHost):  # type: ignore[no-untyped-def]
    nvml.h200_host(host)
    with nvml.install(nvml.load_h200()) as library:
        yield host, library


def backend_on(host: FakeHost, cuda: bool = True, **options: str) -> NvidiaBackend:
    """The backend with CUDA answering as it did on the H200 host (132 SMs), or not at all."""
    context = BackendContext(host_root=host.root, node_name="gpu-node", options=options)
    answers = nvml.FakeCuda.replaying(nvml.load_h200()) if cuda else nvml.FakeCuda({})
    return NvidiaBackend(context, cuda=answers)


def test_unidra_inspect_lists_the_h200(h200, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    host, _ = h200
    argv = ["inspect", "--vendors", "nvidia", "--host-root", str(host.root)]
    assert cli.main([*argv, "-o", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    [gpu] = document["devices"]
    assert (gpu["name"], gpu["model"], gpu["memoryBytes"], gpu["pciBusID"]) == (
        NAME,
        "NVIDIA H200",
        150754820096,
        "0000:00:06.0",
    )
    assert (gpu["architecture"], gpu["computeCapability"], gpu["computeUnits"]) == (
        "hopper",
        "9.0",
        132,  # no libcuda here: 16896 cores / 128 per Hopper SM, as NVML answered
    )
    assert gpu["numaNode"] is None  # numa_node -1 and no node cpulists recorded: unknown
    assert gpu["offeredProfiles"] == [
        {"name": "1g.18gb", "instances": 7, "computeUnits": 16, "memoryBytes": 16384 << 20}
    ]
    assert cli.main(argv) == 0
    [header, row] = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:7] == ["NAME", "VENDOR", "TYPE", "MODEL", "ARCH", "MEMORY", "UNITS"]
    assert row.split() == [
        NAME,
        "nvidia",
        "gpu",
        "NVIDIA",
        "H200",
        "hopper",
        "140.4",
        "GiB",
        "132",
        "0000:00:06.0",
        "-",
        "-",
    ]


def test_the_sm_count_comes_from_cuda_first(h200) -> None:  # type: ignore[no-untyped-def]
    host, library = h200
    [gpu] = backend_on(host).discover()
    assert gpu.compute_units == 132
    assert "nvmlDeviceGetNumGpuCores" not in library.calls


def test_no_sm_count_at_all_is_left_out_not_zero(h200) -> None:  # type: ignore[no-untyped-def]
    host, library = h200
    library.failing["nvmlDeviceGetNumGpuCores"] = "NotSupported"
    backend = backend_on(host, cuda=False)
    found = conformance.check(backend)
    [entry] = slices.build(found)[0].devices
    assert found.devices[0].compute_units is None
    assert set(entry["capacity"]) == {"memory"}


def test_the_slice_is_the_one_the_host_published_with_132_compute_units(h200) -> None:  # type: ignore[no-untyped-def]
    host, _ = h200
    found = conformance.check(backend_on(host))
    [published] = json.loads((nvml.H200 / "slice-as-published.json").read_text())
    [real] = published["spec"]["devices"]
    [ours] = slices.build(found)[0].devices
    assert ours["attributes"] == real["attributes"]
    assert real["capacity"]["computeUnits"] == {"value": "0"}  # what the host got before
    assert ours["capacity"] == {
        "computeUnits": {"value": "132"},
        "memory": real["capacity"]["memory"],
    }


def test_offered_mig_profiles_are_not_published(h200) -> None:  # type: ignore[no-untyped-def]
    host, _ = h200
    found = conformance.check(backend_on(host), partitions=True)
    assert found.partitions == {}
    assert [d["name"] for c in slices.build(found) for d in c.devices] == [NAME]


def test_partitions_flag_says_in_one_line_that_nothing_is_published(h200, capsys) -> None:  # type: ignore[no-untyped-def]
    host, _ = h200
    argv = ["inspect", "--vendors", "nvidia", "--host-root", str(host.root), "--partitions"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert "--partitions: the nvidia backend cannot create partitions at prepare" in captured.err
    assert "mig" not in captured.out


@pytest.mark.parametrize(
    ("cpulists", "node"),
    [
        ({0: "0-15"}, 0),  # one node holds the GPU's local CPUs 0-15
        ({0: "0-7", 1: "8-15"}, None),  # local to CPUs of two nodes: no guess
        ({0: "0-15", 1: ""}, 0),  # a memory-only node has no CPUs
    ],
)
def test_numa_from_local_cpus_only_when_one_node_holds_them(
    h200, cpulists: dict[int, str], node: int | None
) -> None:  # type: ignore[no-untyped-def]
    host, _ = h200
    for number, cpus in cpulists.items():
        host.file(f"/sys/devices/system/node/node{number}/cpulist", f"{cpus}\n")
    [gpu] = backend_on(host).discover()
    assert gpu.numa_node == node


def test_numa_from_nvml_affinity(h200) -> None:  # type: ignore[no-untyped-def]
    host, library = h200
    library.recording["devices"][0]["memoryAffinity"] = [1]
    [gpu] = backend_on(host).discover()
    assert gpu.numa_node == 1
    del library.recording["devices"][0]["memoryAffinity"]  # not recorded: NVML_ERROR_UNKNOWN
    library.recording["devices"][0]["cpuAffinity"] = list(range(8, 16))
    host.file("/sys/devices/system/node/node0/cpulist", "0-7\n")
    host.file("/sys/devices/system/node/node1/cpulist", "8-15\n")
    [gpu] = backend_on(host).discover()
    assert gpu.numa_node == 1


def test_every_optional_read_may_fail(h200) -> None:  # type: ignore[no-untyped-def]
    """The conformance property on the real H200's answers. Here the UUID and minor number fall
    back to /proc/driver/nvidia, so they are broken too; so is CUDA."""
    host, library = h200

    def with_cuda() -> NvidiaBackend:
        return backend_on(host)

    def without_cuda() -> NvidiaBackend:
        return backend_on(host, cuda=False)

    library.calls.clear()
    without_cuda().discover()  # CUDA answering would hide NVML's fallbacks

    def install(call: str, error: str) -> object:
        library.failing[call] = error
        return lambda: library.failing.pop(call)

    identity = {"nvmlInitWithFlags", "nvmlDeviceGetCount_v2", "nvmlDeviceGetHandleByIndex_v2"}
    identity.add("nvmlDeviceGetPciInfo_v3")
    broken = faults.library_faults(
        sorted(set(library.calls) - identity),
        faults.NVML_ERRORS,
        install,  # type: ignore[arg-type]
    )
    broken += faults.file_faults(host.root, lambda: without_cuda().discover())
    labels = {label.split(" ")[0] for label, _ in broken}
    assert {"nvmlDeviceGetUUID", "nvmlDeviceGetMinorNumber", "nvmlDeviceGetNumGpuCores"} <= labels
    assert "1" in labels  # x /proc/driver/nvidia/gpus/0000:00:06.0/information, numa_node, ...
    for build in (with_cuda, without_cuda):
        assert conformance.check_optional_reads(build, broken) == len(broken)


def test_uuid_and_minor_fall_back_to_proc(h200) -> None:  # type: ignore[no-untyped-def]
    host, library = h200
    library.failing["nvmlDeviceGetUUID"] = "Unknown"
    library.failing["nvmlDeviceGetMinorNumber"] = "NoPermission"
    backend = backend_on(host)
    [gpu] = backend.discover()
    # The /proc entry was read in another VM of the same host, where the UUID differed.
    assert gpu.uuid == "GPU-fa882476-5346-1247-7659-d757ff256b4e"
    assert [n.path for n in backend.device_edits(gpu).device_nodes] == ["/dev/nvidia0"]


# -- what a CUDA container gets -------------------------------------------------------------------


def claim_spec(backend: NvidiaBackend) -> dict:  # type: ignore[type-arg]
    return container.claim_spec(backend, list(backend.discover()))


@pytest.mark.parametrize("hook", [False, True], ids=["no-cdi-hook (as on the H200)", "cdi-hook"])
def test_a_cuda_container_finds_every_soname_and_nvidia_smi(
    host: FakeHost, tmp_path: Path, hook: bool
) -> None:
    nvml.h200_host(host, hook=hook)
    with nvml.install(nvml.load_h200()):
        spec = claim_spec(backend_on(host))
    seen = container.resolve(spec, host.root, tmp_path / "rootfs")
    for soname in SONAMES:
        found = seen.find_library(soname)
        assert found is not None, f"a CUDA image would not find {soname}"
        assert seen.path(found).read_text().startswith("ELF")
    assert seen.find_library("libcuda.so") is not None  # what `-lcuda` links against
    assert seen.find_program("nvidia-smi") == "/usr/bin/nvidia-smi"
    # The nodes the real host's spec had are still there.
    produced = json.loads((nvml.H200 / "cdi-spec-as-produced.json").read_text())
    assert spec["containerEdits"]["deviceNodes"] == produced["containerEdits"]["deviceNodes"]
    assert spec["devices"][0]["containerEdits"] == produced["devices"][0]["containerEdits"]


def test_without_the_hook_an_image_without_ld_library_path_finds_them_too(
    host: FakeHost, tmp_path: Path
) -> None:
    nvml.h200_host(host)
    with nvml.install(nvml.load_h200()):
        spec = claim_spec(backend_on(host))
    seen = container.resolve(spec, host.root, tmp_path / "rootfs")
    for soname in SONAMES:
        assert seen.find_library(soname, library_path=()) == f"/usr/lib/x86_64-linux-gnu/{soname}"


def gpu_operator_host(host: FakeHost) -> FakeHost:
    """The driver in a GPU-operator root: a whole file system with its own loader cache."""
    nvml.h200_host(host)
    for path in ("/usr/local/nvidia", "/etc/ld.so.cache"):
        target = host.root / path.lstrip("/")
        if target.is_dir() and not target.is_symlink():
            import shutil

            shutil.rmtree(target)
        else:
            target.unlink()
    root, lib, version = "/run/nvidia/driver", "/usr/lib/x86_64-linux-gnu", "580.159.04"
    cached = []
    for soname in SONAMES:
        base = soname.split(".so", 1)[0]
        host.file(f"{root}{lib}/{base}.so.{version}", f"ELF {base}\n")
        host.link(f"{root}{lib}/{soname}", f"{base}.so.{version}")
        cached.append((soname, f"{lib}/{soname}"))
    host.ld_cache(cached, f"{root}/etc/ld.so.cache")
    host.executable(f"{root}/usr/bin/nvidia-smi", "exit 0\n")
    return host


def test_a_gpu_operator_driver_root(host: FakeHost, tmp_path: Path) -> None:
    gpu_operator_host(host)
    with nvml.install(nvml.load_h200()):
        backend = backend_on(host, **{"driver-root": "/run/nvidia/driver"})
        files = backend.driver_files()
        spec = claim_spec(backend)
    assert files.root == "/run/nvidia/driver" and files.missing() == []
    assert files.library_folders == ("/run/nvidia/driver/usr/lib/x86_64-linux-gnu",)
    assert files.sources["libcuda.so.1"] == "driver root /run/nvidia/driver"
    mounts = {m["containerPath"]: m["hostPath"] for m in spec["containerEdits"]["mounts"]}
    # The root is stripped inside the container, as nvidia-ctk does.
    assert mounts["/usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04"] == (
        "/run/nvidia/driver/usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04"
    )
    seen = container.resolve(spec, host.root, tmp_path / "rootfs")
    assert all(seen.find_library(soname) for soname in SONAMES)


def test_a_driver_found_only_where_nvml_was_loaded_from(
    host: FakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml.h200_host(host)
    (host.root / "etc/ld.so.cache").unlink()
    (host.root / "usr/local/nvidia").rename(host.root / "opt-driver")
    lib = host.root / "opt-driver/lib64"
    maps = tmp_path / "maps"
    maps.write_text(
        f"7f0000000000-7f0000100000 r-xp 00000000 08:01 42   {lib}/libnvidia-ml.so.580.159.04\n"
    )
    monkeypatch.setattr(driver_files, "PROC_MAPS", maps)
    with nvml.install(nvml.load_h200()):
        files = backend_on(host).driver_files()
    assert files.libraries["libcuda.so.1"] == "/opt-driver/lib64/libcuda.so.580.159.04"
    assert files.sources["libcuda.so.1"] == "the folder NVML was loaded from"
    assert files.binaries["nvidia-smi"] == "/opt-driver/bin/nvidia-smi"


@pytest.mark.parametrize("option", ["run/nvidia/driver", "/run/nvidia/../etc"])
def test_a_bad_driver_root_is_a_config_error(h200, option: str) -> None:  # type: ignore[no-untyped-def]
    host, _ = h200
    with pytest.raises(ConfigError, match=r"nvidia\.driver-root=.*expected an absolute host path"):
        backend_on(host, **{"driver-root": option})


# -- the CUDA driver API through ctypes ----------------------------------------------------------


class FakeLibcuda:
    """libcuda.so.1's three entry points, taking ctypes arguments as the real ones do."""

    def __init__(self, by_bus: dict[bytes, int], counts: dict[int, int]) -> None:
        self.by_bus, self.counts, self.initialised = by_bus, counts, False

    def cuInit(self, flags: int) -> int:  # the C names
        self.initialised = True
        return 0

    def cuDeviceGetByPCIBusId(self, device, bus: bytes) -> int:  # type: ignore[no-untyped-def]
        if bus not in self.by_bus:
            return 101  # CUDA_ERROR_INVALID_DEVICE
        device._obj.value = self.by_bus[bus]
        return 0

    def cuDeviceGetAttribute(self, value, attribute: int, device) -> int:  # type: ignore[no-untyped-def]
        assert attribute == 16 and self.initialised
        value._obj.value = self.counts[device.value]
        return 0


def test_the_cuda_driver_api_through_ctypes() -> None:
    # CUDA numbers GPUs its own way (fastest first): the PCI address finds the right one.
    library = FakeLibcuda({b"0000:00:06.0": 3}, {3: 132})
    loaded: list[str] = []

    def load(name: str) -> FakeLibcuda:
        loaded.append(name)
        if name == "libcuda.so.1":
            raise OSError("libcuda.so.1: cannot open shared object file")
        return library

    driver = CudaDriver(lambda: ["/host/usr/local/nvidia/lib64"], load)
    assert driver.multiprocessors("0000:00:06.0") == 132
    assert loaded == ["libcuda.so.1", "/host/usr/local/nvidia/lib64/libcuda.so.1"]
    with pytest.raises(CudaError, match="cuDeviceGetByPCIBusId returned CUresult 101"):
        driver.multiprocessors("0000:01:00.0")


def test_a_missing_libcuda_is_one_error_remembered() -> None:
    calls = []

    def load(name: str) -> object:
        calls.append(name)
        raise OSError(f"{name}: cannot open shared object file")

    driver = CudaDriver(list, load)
    for _ in range(2):
        with pytest.raises(CudaError, match=r"cannot load libcuda\.so\.1"):
            driver.multiprocessors(BDF)
    assert calls == ["libcuda.so.1"]  # tried once, not per GPU


def test_the_recorder_keeps_what_the_h200_answered(h200) -> None:  # type: ignore[no-untyped-def]
    """hack/smoke-nvidia now also records the core count, serial, affinities, MIG profiles and
    CUDA's SM count; replayed, the recording gives the same GPU."""
    host, _ = h200
    recorded = commands.hack_script("smoke.py").record_nvidia(host.root)
    [device] = recorded["devices"]
    assert (device["numGpuCores"], device["serial"]) == (16896, "1653924120332")
    assert device["gpuInstanceProfiles"]["0"]["name"] == "MIG 1g.18gb"
    assert device["attributes"] == {"error": "NotSupported"}
    assert device["cpuAffinity"] == {"error": "Unknown"}  # not in the recording it replays
    assert recorded["cudaMultiprocessors"] == {BDF: {"error": "CudaError"}}  # no libcuda here
    with nvml.install(recorded):
        context = BackendContext(host_root=host.root)
        [gpu] = NvidiaBackend(context, cuda=nvml.FakeCuda.replaying(recorded)).discover()
    assert (gpu.name, gpu.compute_units, gpu.memory_bytes) == (NAME, 132, 150754820096)
