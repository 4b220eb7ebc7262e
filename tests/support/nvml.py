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
                  "supportedEventTypes"}]}

Any value may instead be {"error": "NotSupported"} (an NVMLError name without its prefix): the
C function then returns that error code, as the driver would.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia"
_DEVICE_BASE = 0x1000
_MIG_BASE = 0x100000
_GI_BASE = 0x200000
_SET_BASE = 0x300000


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def _code(name: str) -> int:
    error_class = getattr(pynvml, f"NVMLError_{name}")
    for code, cls in pynvml.NVMLError._valClassMapping.items():  # the real code-to-class table
        if cls is error_class:
            return int(code)
    raise KeyError(name)


class _Fail(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"error"}:
        raise _Fail(_code(value["error"]))
    return value


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

    # Every attribute lookup is a C symbol; wrap it so recorded errors become return codes.
    def __getattr__(self, name: str) -> Any:
        implementation = getattr(type(self), f"_{name}", None)
        if implementation is None:
            raise AttributeError(name)

        def call(*args: Any) -> int:
            self.calls.append(name)
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
        buffer.value = _value(self.recording["system"]["driverVersion"]).encode()

    def _nvmlSystemGetCudaDriverVersion(self, ref: Any) -> None:
        ref._obj.value = _value(self.recording["system"]["cudaDriverVersion"])

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
        buffer.value = _value(self._any(handle)["uuid"]).encode()

    def _nvmlDeviceGetName(self, handle: Any, buffer: Any, size: Any) -> None:
        buffer.value = _value(self._device(handle)["name"]).encode()

    def _nvmlDeviceGetIndex(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _value(self._device(handle)["index"])

    def _nvmlDeviceGetMinorNumber(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _value(self._device(handle)["minor"])

    def _nvmlDeviceGetPciInfo_v3(self, handle: Any, ref: Any) -> None:
        ref._obj.busId = _value(self._device(handle)["busId"]).encode()

    def _nvmlDeviceGetMemoryInfo(self, handle: Any, ref: Any) -> None:
        memory = _value(self._any(handle)["memory"])
        ref._obj.total, ref._obj.free, ref._obj.used = (
            memory["total"],
            memory["free"],
            memory["used"],
        )

    def _nvmlDeviceGetArchitecture(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _value(self._device(handle)["architecture"])

    def _nvmlDeviceGetCudaComputeCapability(self, handle: Any, major: Any, minor: Any) -> None:
        major._obj.value, minor._obj.value = _value(self._device(handle)["cudaComputeCapability"])

    def _nvmlDeviceGetAttributes_v2(self, handle: Any, ref: Any) -> None:
        for key, value in _value(self._any(handle)["attributes"]).items():
            setattr(ref._obj, key, value)

    def _nvmlDeviceGetNumaNodeId(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _value(self._device(handle)["numaNode"])

    def _nvmlDeviceGetVbiosVersion(self, handle: Any, buffer: Any, size: Any) -> None:
        buffer.value = _value(self._device(handle)["vbiosVersion"]).encode()

    # -- MIG -----------------------------------------------------------------------------------------
    def _nvmlDeviceGetMigMode(self, handle: Any, current: Any, pending: Any) -> None:
        current._obj.value, pending._obj.value = _value(self._device(handle)["migMode"])

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
        fabric = _value(self._device(handle).get("fabric", {"error": "NotSupported"}))
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
        ref._obj.value = _value(self._device(handle).get("supportedEventTypes", 0))

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
        utilization = _value(self._device(handle)["utilization"])
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
        ref._obj.value = _value(self._device(handle)["powerUsage"])

    def _nvmlDeviceGetTotalEnergyConsumption(self, handle: Any, ref: Any) -> None:
        ref._obj.value = _value(self._device(handle)["totalEnergyConsumption"])

    def _nvmlDeviceGetTemperature(self, handle: Any, sensor: Any, ref: Any) -> None:
        ref._obj.value = _value(self._device(handle)["temperature"])

    def _nvmlDeviceGetTotalEccErrors(
        self, handle: Any, error_type: Any, counter: Any, ref: Any
    ) -> None:
        counts = _value(self._device(handle)["eccErrors"])
        ref._obj.value = counts["corrected" if _int(error_type) == 0 else "uncorrected"]

    def _nvmlDeviceGetRemappedRows(
        self, handle: Any, corrected: Any, uncorrected: Any, pending: Any, failed: Any
    ) -> None:
        rows = _value(self._device(handle)["remappedRows"])
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
