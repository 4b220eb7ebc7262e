"""A fake NVML native library for the real `pynvml`: recorded answers served at the C level.

`install(recording)` puts a FakeNvmlLibrary where pynvml keeps the loaded libnvidia-ml, so every
pynvml wrapper runs unchanged: its structs, string conversions and NVMLError classes are the
real ones. A recording is what hack/smoke-nvidia writes on a real node:

    {"system": {"driverVersion": "...", "cudaDriverVersion": 12080},
     "devices": [{"index", "uuid", "name", "minor", "busId", "memory": {total, free, used},
                  "architecture", "cudaComputeCapability": [major, minor],
                  "attributes": {multiprocessorCount, gpuInstanceSliceCount, memorySizeMB},
                  "numaNode", "vbiosVersion", "migMode": [current, pending],
                  "nvlinks": [{link, state, remoteBusId, remoteDeviceType}],
                  "fabric": {clusterUuid (hex), status, cliqueId, state},
                  "migDevices": [{slot, uuid, gpuInstanceId, computeInstanceId, placementStart,
                                  placementSize, memory, attributes}],
                  "utilization": {gpu, memory}, "powerUsage", "totalEnergyConsumption",
                  "temperature", "eccErrors": {corrected, uncorrected}, "remappedRows": [4],
                  "supportedEventTypes", "numGpuCores", "serial", "cpuAffinity": [cpus],
                  "memoryAffinity": [nodes],
                  "gpuInstanceProfiles": {"<profile index>": {id, sliceCount, instanceCount,
                                          multiprocessorCount, memorySizeMB, name, ...}}}]}

Any value may instead be {"error": "NotSupported"} (an NVMLError name without its prefix): the
C function then returns that error code, as the driver would. A call the recording has no answer
for returns NVML_ERROR_UNKNOWN: the fake never makes a value up. A GPU instance profile index
missing from "gpuInstanceProfiles" answers NotSupported, as NVML does for profiles a GPU lacks.
`failing[symbol] = "NoPermission"` makes one C function fail for every device, for tests that
break one read at a time.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import queue
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml

from support.hosts import FakeHost
from vendors.nvidia.cuda import CudaError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia"
H200 = FIXTURES / "h200"  # a copy of what a real H200 host answered (README.md there)
H200_BDF = "0000:00:06.0"
_DEVICE_BASE = 0x1000
_MIG_BASE = 0x100000
_GI_BASE = 0x200000
_SET_BASE = 0x300000


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def load_h200() -> dict[str, Any]:
    """The real H200's recording, plus the answers its probe.json and host-layout.txt add.

    Everything here comes from those files: the serial, GPU instance profile index 0 (the one
    profile the probe asked for), and the core count. NVML's CPU and memory affinity answered
    there but their values were not written down, so the replay answers Unknown for them.
    """
    recording = json.loads((H200 / "recorded-h200.json").read_text())
    probe = json.loads((H200 / "probe.json").read_text())
    device = recording["devices"][0]
    device["serial"] = probe["nvmlDeviceGetSerial"]
    device["gpuInstanceProfiles"] = {"0": probe["nvmlDeviceGetGpuInstanceProfileInfo"]}
    device["numGpuCores"] = int(_layout(r"nvmlDeviceGetNumGpuCores (\d+)"))
    # What cuDeviceGetAttribute(MULTIPROCESSOR_COUNT) answered there, as hack/smoke-nvidia records it.
    recording["cudaMultiprocessors"] = {H200_BDF: int(_layout(r"cuDeviceGetAttribute SM 0 (\d+)"))}
    return recording


def _layout(pattern: str) -> str:
    match = re.search(pattern, (H200 / "host-layout.txt").read_text())
    assert match is not None, pattern
    return match.group(1)


class FakeCuda:
    """The CUDA driver API's SM counts by PCI address, as a host answered them."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    @classmethod
    def replaying(cls, recording: dict[str, Any]) -> FakeCuda:
        """The answers a recording's "cudaMultiprocessors" holds (errors stay errors)."""
        answers = recording.get("cudaMultiprocessors", {})
        return cls({bdf: count for bdf, count in answers.items() if isinstance(count, int)})

    def multiprocessors(self, bdf: str) -> int:
        if bdf not in self.counts:
            raise CudaError(
                "cuDeviceGetByPCIBusId returned CUresult 101"
            )  # CUDA_ERROR_INVALID_DEVICE
        return self.counts[bdf]


def h200_host(host: FakeHost, hook: bool = False) -> FakeHost:
    """The H200 VM's host tree as host-layout.txt shows it: the GPU at 0000:00:06.0 (numa_node -1,
    local CPUs 0-15), /proc/driver/nvidia, the driver in /usr/local/nvidia (lib -> lib64), and the
    loader cache entries `ldconfig -p` listed. `hook` adds an nvidia-cdi-hook, which that host lacked.
    """
    sysfs = host.pci(H200_BDF, 0x10DE, 0x2335, 0x030200, numa=-1, driver="nvidia", root_bus="00")
    host.file(f"/{sysfs.relative_to(host.root)}/local_cpulist", "0-15\n")
    layout = (H200 / "host-layout.txt").read_text()
    information = layout.split("/information\n", 1)[1].split("+ ", 1)[0]
    host.file(f"/proc/driver/nvidia/gpus/{H200_BDF}/information", information)
    host.proc_devices({"nvidia-frontend": 195, "nvidia-uvm": 238})
    version = "580.159.04"
    lib = "/usr/local/nvidia/lib64"
    for soname in (
        "libcuda.so.1",
        "libnvidia-ml.so.1",
        "libnvidia-ptxjitcompiler.so.1",
        "libnvidia-nvvm.so.4",
        "libnvidia-opencl.so.1",
    ):
        base = soname.split(".so", 1)[0]
        host.file(f"{lib}/{base}.so.{version}", f"ELF {base}\n")
        host.link(f"{lib}/{soname}", f"{base}.so.{version}")
    host.file(f"{lib}/libnvidia-pkcs11-openssl3.so.{version}", "ELF pkcs11\n")
    host.link("/usr/local/nvidia/lib", "lib64")
    host.file("/usr/local/nvidia/version", f"{version}\n")
    for binary in (
        "nvidia-smi",
        "nvidia-debugdump",
        "nvidia-cuda-mps-control",
        "nvidia-cuda-mps-server",
    ):
        host.executable(f"/usr/local/nvidia/bin/{binary}", "exit 0\n")
    cached = re.findall(r"^\t(\S+) \(libc6,x86-64\) => (\S+)$", layout, re.MULTILINE)
    host.ld_cache(cached)
    if hook:
        host.executable("/usr/bin/nvidia-cdi-hook", "exit 0\n")
    return host


def _code(name: str) -> int:
    error_class = getattr(pynvml, f"NVMLError_{name}")
    for code, cls in pynvml.NVMLError._valClassMapping.items():  # the real code-to-class table
        if cls is error_class:
            return int(code)
    raise KeyError(name)


class _Fail(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


_NOT_RECORDED = {"error": "Unknown"}


def _value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"error"}:
        raise _Fail(_code(value["error"]))
    return value


def _answer(record: dict[str, Any], key: str) -> Any:
    """The recorded answer to one call, or NVML_ERROR_UNKNOWN when the recording has none."""
    return _value(record.get(key, _NOT_RECORDED))


def _fill(struct: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        setattr(struct, key, value.encode() if isinstance(value, str) else value)


def _set_pointer(ref: Any, value: int) -> None:
    ctypes.cast(ctypes.byref(ref._obj), ctypes.POINTER(ctypes.c_void_p))[0] = value


def _pointer(handle: Any) -> int:
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


def _int(value: Any) -> int:
    return int(value.value) if hasattr(value, "value") else int(value)


class FakeNvmlLibrary:
    """The C functions of libnvidia-ml that Unidra calls, answering from a recording."""

    def __init__(self, recording: dict[str, Any], init_error: str | None = None) -> None:
        self.recording = copy.deepcopy(recording)
        self.init_error = init_error
        self.events: queue.Queue[tuple[int, int, int] | str] = queue.Queue()
        self.registered: dict[int, int] = {}
        self.calls: list[str] = []
        self.failing: dict[str, str] = {}

    # Every attribute lookup is a C symbol; wrap it so recorded errors become return codes.
    def __getattr__(self, name: str) -> Any:
        implementation = getattr(type(self), f"_{name}", None)
        if implementation is None:
            raise AttributeError(name)

        def call(*args: Any) -> int:
            self.calls.append(name)
            if name in self.failing:
                return _code(self.failing[name])
            try:
                return int(implementation(self, *args) or 0)
            except _Fail as failure:
                return failure.code

        return call

    def emit(self, device_index: int, event_type: int, data: int = 0) -> None:
        """Queue an NVML event, as the driver would raise it."""
        self.events.put((device_index, event_type, data))

    def lose_gpu(self, device_index: int) -> None:
        """The GPU falls off the bus: its queries fail and the next event wait says so."""
        self.recording["devices"][device_index]["uuid"] = {"error": "GpuIsLost"}
        self.events.put("lost")

    def _device(self, handle: Any) -> dict[str, Any]:
        pointer = _pointer(handle)
        if pointer >= _MIG_BASE:
            raise _Fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.recording["devices"][pointer - _DEVICE_BASE]

    def _mig(self, handle: Any) -> dict[str, Any]:
        pointer = _pointer(handle) - _MIG_BASE
        return self.recording["devices"][pointer // 0x100]["migDevices"][pointer % 0x100]

    def _any(self, handle: Any) -> dict[str, Any]:
        return self._mig(handle) if _pointer(handle) >= _MIG_BASE else self._device(handle)

    # -- library ------------------------------------------------------------------------------
    def _nvmlInitWithFlags(self, flags: int) -> int:
        return _code(self.init_error) if self.init_error else 0

    def _nvmlShutdown(self) -> int:
        return 0

    def _nvmlSystemGetDriverVersion(self, buffer: Any, size: Any) -> None:
        buffer.value = _answer(self.recording["system"], "driverVersion").encode()

    def _nvmlSystemGetCudaDriverVersion(self, ref: Any) -> None:
        ref._obj.value = _answer(self.recording["system"], "cudaDriverVersion")

    def _nvmlDeviceGetCount_v2(self, ref: Any) -> None:
        ref._obj.value = len(self.recording["devices"])

    def _nvmlDeviceGetHandleByIndex_v2(self, index: Any, ref: Any) -> None:
        position = _int(index)
        if position >= len(self.recording["devices"]):
            raise _Fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        _value(self.recording["devices"][position].get("handle", 0))
        _set_pointer(ref, _DEVICE_BASE + position)

    # -- identity -------------------------------------------------------------------------------
    def _nvmlDeviceGetUUID(self, handle: Any, buffer: Any, size: Any) -> None:
        buffer.value = _answer(self._any(handle), "uuid").encode()

    def _nvmlDeviceGetName(self, handle: Any, buffer: Any, size: Any) -> None:
        buffer.value = _answer(self._device(handle), "name").encode()

    def _nvmlDeviceGetIndex(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _answer(self._device(handle), "index")

    def _nvmlDeviceGetMinorNumber(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _answer(self._device(handle), "minor")

    def _nvmlDeviceGetPciInfo_v3(self, handle: Any, ref: Any) -> None:
        ref._obj.busId = _answer(self._device(handle), "busId").encode()

    def _nvmlDeviceGetMemoryInfo(self, handle: Any, ref: Any) -> None:
        memory = _answer(self._any(handle), "memory")
        ref._obj.total, ref._obj.free, ref._obj.used = (
            memory["total"],
            memory["free"],
            memory["used"],
        )

    def _nvmlDeviceGetArchitecture(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _answer(self._device(handle), "architecture")

    def _nvmlDeviceGetCudaComputeCapability(self, handle: Any, major: Any, minor: Any) -> None:
        major._obj.value, minor._obj.value = _answer(self._device(handle), "cudaComputeCapability")

    def _nvmlDeviceGetAttributes_v2(self, handle: Any, ref: Any) -> None:
        for key, value in _answer(self._any(handle), "attributes").items():
            setattr(ref._obj, key, value)

    def _nvmlDeviceGetNumaNodeId(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _answer(self._device(handle), "numaNode")

    def _nvmlDeviceGetVbiosVersion(self, handle: Any, buffer: Any, size: Any) -> None:
        buffer.value = _answer(self._device(handle), "vbiosVersion").encode()

    def _nvmlDeviceGetSerial(self, handle: Any, buffer: Any, size: Any) -> None:
        buffer.value = _answer(self._device(handle), "serial").encode()

    def _nvmlDeviceGetNumGpuCores(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _answer(self._device(handle), "numGpuCores")

    def _nvmlDeviceGetCpuAffinity(self, handle: Any, size: Any, ref: Any) -> None:
        for cpu in _answer(self._device(handle), "cpuAffinity"):
            ref._obj[cpu // 64] |= 1 << (cpu % 64)

    def _nvmlDeviceGetMemoryAffinity(self, handle: Any, size: Any, ref: Any, scope: Any) -> None:
        for node in _answer(self._device(handle), "memoryAffinity"):
            ref._obj[node // 64] |= 1 << (node % 64)

    # -- MIG -----------------------------------------------------------------------------------------
    def _nvmlDeviceGetGpuInstanceProfileInfoV(self, handle: Any, profile: Any, ref: Any) -> None:
        profiles = _answer(self._device(handle), "gpuInstanceProfiles")
        _fill(ref._obj, _value(profiles.get(str(_int(profile)), {"error": "NotSupported"})))

    def _nvmlDeviceGetGpuInstanceProfileInfoByIdV(
        self, handle: Any, profile_id: Any, ref: Any
    ) -> None:
        profiles = _answer(self._device(handle), "gpuInstanceProfiles").values()
        matching = [p for p in profiles if isinstance(p, dict) and p.get("id") == _int(profile_id)]
        _fill(ref._obj, _value(matching[0] if matching else {"error": "NotSupported"}))

    def _nvmlDeviceGetMigMode(self, handle: Any, current: Any, pending: Any) -> None:
        current._obj.value, pending._obj.value = _answer(self._device(handle), "migMode")

    def _nvmlDeviceGetMaxMigDeviceCount(self, handle: Any, ref: Any) -> None:
        ref._obj.value = 7 if self._device(handle).get("migDevices") else 0

    def _nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: Any, ref: Any) -> None:
        device = self._device(handle)
        slot = _int(index)
        if slot >= len(device.get("migDevices", [])):
            raise _Fail(pynvml.NVML_ERROR_NOT_FOUND)
        _set_pointer(ref, _MIG_BASE + (_pointer(handle) - _DEVICE_BASE) * 0x100 + slot)

    def _nvmlDeviceGetGpuInstanceId(self, handle: Any, ref: Any) -> None:
        ref._obj.value = self._mig(handle)["gpuInstanceId"]

    def _nvmlDeviceGetComputeInstanceId(self, handle: Any, ref: Any) -> None:
        ref._obj.value = self._mig(handle)["computeInstanceId"]

    def _nvmlDeviceGetGpuInstanceById(self, handle: Any, gi_id: Any, ref: Any) -> None:
        device_index = _pointer(handle) - _DEVICE_BASE
        migs = self._device(handle).get("migDevices", [])
        slot = next((i for i, m in enumerate(migs) if m["gpuInstanceId"] == _int(gi_id)), None)
        if slot is None:
            raise _Fail(pynvml.NVML_ERROR_NOT_FOUND)
        _set_pointer(ref, _GI_BASE + device_index * 0x100 + slot)

    def _nvmlGpuInstanceGetInfo(self, instance: Any, ref: Any) -> None:
        pointer = _pointer(instance) - _GI_BASE
        mig = self.recording["devices"][pointer // 0x100]["migDevices"][pointer % 0x100]
        ref._obj.id = mig["gpuInstanceId"]
        ref._obj.profileId = mig.get("profileId", 0)
        ref._obj.placement.start = mig["placementStart"]
        ref._obj.placement.size = mig["placementSize"]

    # -- NVLink and fabric ------------------------------------------------------------------------
    def _link(self, handle: Any, link: Any) -> dict[str, Any]:
        for entry in self._device(handle).get("nvlinks", []):
            if entry["link"] == _int(link):
                return entry
        raise _Fail(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def _nvmlDeviceGetNvLinkState(self, handle: Any, link: Any, ref: Any) -> None:
        ref._obj.value = self._link(handle, link)["state"]

    def _nvmlDeviceGetNvLinkRemotePciInfo_v2(self, handle: Any, link: Any, ref: Any) -> None:
        ref._obj.busId = self._link(handle, link)["remoteBusId"].encode()

    def _nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: Any, link: Any, ref: Any) -> None:
        ref._obj.value = self._link(handle, link)["remoteDeviceType"]

    def _nvmlDeviceGetGpuFabricInfoV(self, handle: Any, ref: Any) -> None:
        fabric = _answer(self._device(handle), "fabric")
        info = ref._obj
        info.clusterUuid[:] = list(bytes.fromhex(fabric["clusterUuid"]))
        info.status, info.cliqueId, info.state = (
            fabric["status"],
            fabric["cliqueId"],
            fabric["state"],
        )

    # -- events ------------------------------------------------------------------------------------
    def _nvmlEventSetCreate(self, ref: Any) -> None:
        _set_pointer(ref, _SET_BASE)

    def _nvmlDeviceGetSupportedEventTypes(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _answer(self._device(handle), "supportedEventTypes")

    def _nvmlDeviceRegisterEvents(self, handle: Any, types: Any, event_set: Any) -> None:
        self.registered[_pointer(handle) - _DEVICE_BASE] = _int(types)

    def _nvmlEventSetWait_v2(self, event_set: Any, ref: Any, timeout: Any) -> int:
        try:
            event = self.events.get(timeout=_int(timeout) / 1000)
        except queue.Empty:
            return pynvml.NVML_ERROR_TIMEOUT
        if event == "lost":
            return pynvml.NVML_ERROR_GPU_IS_LOST
        index, event_type, data = event
        ref._obj.device = ctypes.cast(ctypes.c_void_p(_DEVICE_BASE + index), pynvml.c_nvmlDevice_t)
        ref._obj.eventType, ref._obj.eventData = event_type, data
        ref._obj.gpuInstanceId = ref._obj.computeInstanceId = 0xFFFFFFFF
        return 0

    def _nvmlEventSetFree(self, event_set: Any) -> None:
        return None

    # -- metrics -----------------------------------------------------------------------------------
    def _nvmlDeviceGetUtilizationRates(self, handle: Any, ref: Any) -> None:
        utilization = _answer(self._device(handle), "utilization")
        ref._obj.gpu, ref._obj.memory = utilization["gpu"], utilization["memory"]

    def _nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any, count: Any, infos: Any) -> int:
        """Processes using the GPU (`processes`: [{pid, usedGpuMemory}]); NotSupported unrecorded.
        Like the C function: with no array, the count and INSUFFICIENT_SIZE if there are any."""
        processes = _value(self._device(handle).get("processes", {"error": "NotSupported"}))
        if infos is None:
            count._obj.value = len(processes)
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE if processes else 0
        for slot, process in enumerate(processes):
            infos[slot].pid = process["pid"]
            infos[slot].usedGpuMemory = process["usedGpuMemory"]
        count._obj.value = len(processes)
        return 0

    def _nvmlDeviceGetPowerUsage(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _answer(self._device(handle), "powerUsage")

    def _nvmlDeviceGetTotalEnergyConsumption(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _answer(self._device(handle), "totalEnergyConsumption")

    def _nvmlDeviceGetTemperature(self, handle: Any, sensor: Any, ref: Any) -> None:
        ref._obj.value = _answer(self._device(handle), "temperature")

    def _nvmlDeviceGetTotalEccErrors(
        self, handle: Any, error_type: Any, counter: Any, ref: Any
    ) -> None:
        counts = _answer(self._device(handle), "eccErrors")
        ref._obj.value = counts["corrected" if _int(error_type) == 0 else "uncorrected"]

    def _nvmlDeviceGetRemappedRows(
        self, handle: Any, corrected: Any, uncorrected: Any, pending: Any, failed: Any
    ) -> None:
        rows = _answer(self._device(handle), "remappedRows")
        corrected._obj.value, uncorrected._obj.value, pending._obj.value, failed._obj.value = rows


@contextlib.contextmanager
def install(recording: dict[str, Any], init_error: str | None = None) -> Iterator[FakeNvmlLibrary]:
    """Serve `recording` to pynvml for the duration of the block."""
    library = FakeNvmlLibrary(recording, init_error)
    with pynvml.libLoadLock:
        saved = pynvml.nvmlLib
        pynvml.nvmlLib = library
        pynvml._nvmlGetFunctionPointer_cache.clear()
    try:
        yield library
    finally:
        with pynvml.libLoadLock:
            pynvml.nvmlLib = saved
            pynvml._nvmlGetFunctionPointer_cache.clear()
