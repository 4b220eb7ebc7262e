"""NVIDIA GPUs through NVML (nvidia-ml-py, module `pynvml`), with sysfs for what NVML does not say.

pynvml itself imports cleanly without a driver; NVML is loaded at `nvmlInit`, so a node without
the library or kernel module gets a one-line reason. GPUs in MIG mode are published as their
MIG devices (the parent is not usable whole), named by profile and placement.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuid_module
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from driver import pci
from driver.backends import BackendContext
from driver.errors import BackendUnavailable, ConfigError
from driver.model import (
    ContainerEdits,
    Device,
    DeviceNode,
    DeviceSample,
    DeviceSharing,
    DeviceType,
    HealthEvent,
    Hook,
    Interconnect,
    Mount,
    ProcessUsage,
    Sharing,
    SharingSupport,
)
from driver.pci import PciMatch
from vendors.host import Host
from vendors.nvidia import capabilities, topology
from vendors.nvidia.sharing import NvidiaSharing

log = logging.getLogger(__name__)

LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/aarch64-linux-gnu", "/usr/lib")
# Driver libraries CUDA workloads load, mounted at the same path (what nvidia-ctk's spec mounts for compute).
LIBRARIES = (
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-ml.so",
    "libnvidia-nvvm.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-gpucomp.so",
    "libnvidia-allocator.so",
    "libnvidia-cfg.so",
    "libnvidia-opencl.so",
)
BINARIES = ("/usr/bin/nvidia-smi", "/usr/bin/nvidia-debugdump", "/usr/bin/nvidia-cuda-mps-control")
CDI_HOOK = "/usr/bin/nvidia-cdi-hook"
EVENT_WAIT_MS = 1000
ROW_REMAP_POLL_SECONDS = 30.0


@dataclass(frozen=True)
class _Gpu:
    device: Device
    handle: Any
    minor: int
    gpu_instance: int | None = None
    compute_instance: int | None = None


class NvidiaBackend:
    name = "nvidia"
    pci_matches = (PciMatch(0x10DE, classes=(0x0300, 0x0302)),)

    def __init__(self, context: BackendContext, nvml: ModuleType | None = None) -> None:
        self.host = Host(context.host_root)
        self.node_name = context.node_name
        self.ignored_xids = _xids(context.options.get("ignore-xids", ""))
        self.nvml = nvml or _import_pynvml()
        _init(self.nvml)
        self._gpus: dict[str, _Gpu] = {}
        self.sharing = NvidiaSharing(
            self.host, context.state_dir, context.options.get("driver-root", "/")
        )

    # -- discovery -----------------------------------------------------------------------

    def discover(self) -> Sequence[Device]:
        nvml = self.nvml
        driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = _optional(nvml, nvml.nvmlSystemGetCudaDriverVersion)
        cuda_version = f"{cuda // 1000}.{(cuda % 1000) // 10}.0" if cuda else None
        found: list[tuple[Any, dict[str, Any]]] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                found.append((handle, self._describe(handle, index)))
            except nvml.NVMLError as err:
                # A GPU that fell off the bus (or is being reset) must not hide the others.
                log.warning(
                    "Skipping an NVIDIA GPU NVML cannot read",
                    extra={"index": index, "error": str(err)},
                )
        # MIG instances cannot use NVLink peer-to-peer, so GPUs in MIG mode are not fabric members.
        links = topology.domains([info["links"] for _, info in found if not info["mig"]])
        gpus: dict[str, _Gpu] = {}
        for handle, info in found:
            interconnect = links.get(info["uuid"])
            device = Device(
                backend=self.name,
                vendor="nvidia",
                type=DeviceType.GPU,
                model=info["name"],
                architecture=info["architecture"],
                uuid=info["uuid"],
                index=info["index"],
                memory_bytes=info["memory"],
                compute_units=info["multiprocessors"],
                pci_bus_id=info["bdf"],
                pcie_root=pci.pcie_root(self.host.root, info["bdf"]),
                numa_node=info["numa"],
                driver_version=driver_version,
                firmware_version=info["vbios"],
                compute_capability=f"{info['capability'][0]}.{info['capability'][1]}",
                compute_target=f"sm_{info['capability'][0]}{info['capability'][1]}",
                precisions=capabilities.precisions(info["capability"]),
                interconnect=Interconnect("nvlink", interconnect[0]) if interconnect else None,
                peers=interconnect[1] if interconnect else (),
                extra={"gpu.nvidia.com/productName": info["name"][:64]}
                | ({"gpu.nvidia.com/cudaDriverVersion": cuda_version} if cuda_version else {}),
            )
            if info["mig"]:
                for mig in self._mig_devices(handle, device, info):
                    gpus[mig.device.uuid] = mig
            else:
                gpus[device.uuid] = _Gpu(device, handle, info["minor"])
        self._gpus = gpus
        return [gpu.device for gpu in gpus.values()]

    def _describe(self, handle: Any, index: int) -> dict[str, Any]:
        nvml = self.nvml
        bdf = pci.normalize_bdf(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
        capability = tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle))
        numa = _optional(nvml, nvml.nvmlDeviceGetNumaNodeId, handle)
        if numa is None or numa < 0:
            numa = pci.numa_node(self.host.path(f"/sys/bus/pci/devices/{bdf}"))
        mig_mode = _optional(nvml, nvml.nvmlDeviceGetMigMode, handle)
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        return {
            "index": nvml.nvmlDeviceGetIndex(handle),
            "uuid": uuid,
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "minor": nvml.nvmlDeviceGetMinorNumber(handle),
            "bdf": bdf,
            "memory": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            "architecture": capabilities.architecture(
                _optional(nvml, nvml.nvmlDeviceGetArchitecture, handle),
                (capability[0], capability[1]),
            ),
            "capability": (capability[0], capability[1]),
            "multiprocessors": int(nvml.nvmlDeviceGetAttributes(handle).multiprocessorCount),
            "numa": numa,
            "vbios": _optional_text(nvml, nvml.nvmlDeviceGetVbiosVersion, handle),
            "mig": bool(mig_mode and mig_mode[0] == nvml.NVML_DEVICE_MIG_ENABLE),
            "links": self._links(handle, uuid, bdf),
        }

    def _links(self, handle: Any, uuid: str, bdf: str) -> topology.Links:
        nvml = self.nvml
        gpu_peers: list[str] = []
        switches: list[str] = []
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            try:
                if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                    continue
                remote = pci.normalize_bdf(
                    _text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
                )
                kind = _optional(nvml, nvml.nvmlDeviceGetNvLinkRemoteDeviceType, handle, link)
            except (nvml.NVMLError_NotSupported, nvml.NVMLError_InvalidArgument):
                continue  # a link this GPU does not have
            (switches if kind == topology.SWITCH else gpu_peers).append(remote)
        return topology.Links(
            uuid, bdf, tuple(gpu_peers), tuple(sorted(set(switches))), self._fabric(handle)
        )

    def _fabric(self, handle: Any) -> str | None:
        nvml = self.nvml
        info = nvml.c_nvmlGpuFabricInfoV_t()
        try:
            nvml.nvmlDeviceGetGpuFabricInfoV(handle, nvml.byref(info))
        except nvml.NVMLError:
            return None
        if info.state != nvml.NVML_GPU_FABRIC_STATE_COMPLETED or info.status != nvml.NVML_SUCCESS:
            return None
        cluster = bytes(info.clusterUuid)
        if not any(cluster):
            return None
        return f"{uuid_module.UUID(bytes=cluster)}.{info.cliqueId}"

    def _mig_devices(self, handle: Any, parent: Device, info: dict[str, Any]) -> Iterator[_Gpu]:
        nvml = self.nvml
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError_NotFound:
                continue
            attributes = nvml.nvmlDeviceGetAttributes(mig)
            gi_id = nvml.nvmlDeviceGetGpuInstanceId(mig)
            ci_id = nvml.nvmlDeviceGetComputeInstanceId(mig)
            placement = nvml.nvmlGpuInstanceGetInfo(
                nvml.nvmlDeviceGetGpuInstanceById(handle, gi_id)
            ).placement
            profile = capabilities.mig_profile_name(
                attributes.gpuInstanceSliceCount, attributes.memorySizeMB, parent.memory_bytes
            )
            token = profile.replace(".", "")
            device = Device(
                backend=self.name,
                vendor="nvidia",
                type=DeviceType.GPU,
                model=parent.model,
                architecture=parent.architecture,
                uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                index=parent.index,
                memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(mig).total),
                compute_units=int(attributes.multiprocessorCount),
                pci_bus_id=parent.pci_bus_id,
                pcie_root=parent.pcie_root,
                numa_node=parent.numa_node,
                driver_version=parent.driver_version,
                firmware_version=parent.firmware_version,
                compute_capability=parent.compute_capability,
                compute_target=parent.compute_target,
                precisions=parent.precisions,
                extra=parent.extra,
                partition_profile=profile,
                parent_uuid=parent.uuid,
                name_suffix=f"mig-{token}-{placement.start}",
            )
            yield _Gpu(device, mig, info["minor"], gi_id, ci_id)

    # -- container edits ---------------------------------------------------------------------

    def device_edits(self, device: Device) -> ContainerEdits:
        gpu = self._gpus.get(device.uuid)
        if gpu is None:
            raise BackendUnavailable(f"{device.name} is no longer present")
        nodes = [self._node(f"/dev/nvidia{gpu.minor}", "nvidia-frontend", gpu.minor)]
        if gpu.gpu_instance is not None:
            base = f"/proc/driver/nvidia/capabilities/gpu{gpu.minor}/mig/gi{gpu.gpu_instance}"
            for access in (f"{base}/access", f"{base}/ci{gpu.compute_instance}/access"):
                nodes.append(self._cap_node(access))
        return ContainerEdits(device_nodes=tuple(nodes))

    def shared_edits(self, devices: Sequence[Device]) -> ContainerEdits:
        nodes = [
            self._node("/dev/nvidiactl", "nvidia-frontend", 255),
            self._node("/dev/nvidia-uvm", "nvidia-uvm", 0),
            self._node("/dev/nvidia-uvm-tools", "nvidia-uvm", 1),
        ]
        mounts = [Mount(path, path) for path in self._driver_files()]
        hooks = []
        if self.host.path(CDI_HOOK).is_file():
            folders = sorted(
                {m.container_path.rsplit("/", 1)[0] for m in mounts if ".so" in m.container_path}
            )
            for folder in folders:
                hooks.append(
                    Hook(
                        "createContainer",
                        CDI_HOOK,
                        ("nvidia-cdi-hook", "update-ldcache", "--folder", folder),
                    )
                )
        # "void" keeps a legacy nvidia-container-runtime hook from adding every GPU of the node.
        return ContainerEdits(
            env=("NVIDIA_VISIBLE_DEVICES=void",),
            device_nodes=tuple(n for n in nodes if n is not None),
            mounts=tuple(mounts),
            hooks=tuple(hooks),
        )

    def _node(self, path: str, major_name: str, minor: int) -> DeviceNode:
        node = self.host.device_node(path, major_name=major_name, minor=minor)
        if node is None:
            raise BackendUnavailable(
                f"cannot find the device number of {path}: no node and no {major_name} in /proc/devices"
            )
        return node

    def _cap_node(self, access_file: str) -> DeviceNode:
        text = self.host.read(access_file) or ""
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        try:
            minor = int(fields["DeviceFileMinor"])
        except (KeyError, ValueError) as err:
            raise BackendUnavailable(f"cannot read the MIG capability {access_file}") from err
        return self._node(f"/dev/nvidia-caps/nvidia-cap{minor}", "nvidia-caps", minor)

    def _driver_files(self) -> list[str]:
        version = _text(self.nvml.nvmlSystemGetDriverVersion())
        found = []
        for folder in LIBRARY_DIRS:
            for library in LIBRARIES:
                candidate = f"{folder}/{library}.{version}"
                if self.host.path(candidate).is_file():
                    found.append(candidate)
        found += [path for path in BINARIES if self.host.path(path).is_file()]
        return found

    # -- sharing (vendors/nvidia/sharing.py) ----------------------------------------------------

    def sharing_support(self, device: Device) -> SharingSupport | None:
        return self.sharing.support(device)

    def sharing_edits(self, device: Device, sharing: Sharing) -> ContainerEdits:
        return self.sharing.edits(device, sharing)

    def apply_sharing(self, device: Device, state: DeviceSharing | None) -> None:
        self.sharing.apply(device, state)

    # -- health and metrics --------------------------------------------------------------------

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        """NVML events (Xid, double-bit ECC, GPU lost) and a periodic row-remapping check."""
        nvml = self.nvml
        wanted = nvml.nvmlEventTypeXidCriticalError | nvml.nvmlEventTypeDoubleBitEccError
        event_set = nvml.nvmlEventSetCreate()
        by_uuid: dict[str, str] = {}
        try:
            for gpu in {
                g.device.parent_uuid or g.device.uuid: g for g in self._gpus.values()
            }.values():
                handle = (
                    gpu.handle
                    if gpu.gpu_instance is None
                    else nvml.nvmlDeviceGetHandleByIndex(gpu.device.index)
                )
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                by_uuid[uuid] = gpu.device.name
                try:
                    supported = nvml.nvmlDeviceGetSupportedEventTypes(handle)
                    nvml.nvmlDeviceRegisterEvents(handle, wanted & supported, event_set)
                except nvml.NVMLError_NotSupported:
                    yield HealthEvent(
                        gpu.device.name,
                        "unmonitored",
                        message="NVML cannot deliver events for this GPU",
                        healthy=True,
                    )
            next_poll = 0.0
            lost: set[str] = set()
            while not stop.is_set():
                try:
                    data = nvml.nvmlEventSetWait_v2(event_set, EVENT_WAIT_MS)
                except nvml.NVMLError_Timeout:
                    data = None
                except nvml.NVMLError_GpuIsLost:
                    for lost_event in self._lost():
                        lost.add(lost_event.device)
                        yield lost_event
                    stop.wait(1.0)
                    continue
                if data is not None:
                    uuid = _text(nvml.nvmlDeviceGetUUID(data.device))
                    event = classify(
                        data.eventType,
                        data.eventData,
                        by_uuid.get(uuid, uuid),
                        nvml,
                        self.ignored_xids,
                    )
                    if event is not None:
                        yield event
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + ROW_REMAP_POLL_SECONDS
                    yield from self._row_remap_failures()
                    # A lost GPU that answers again (after a reset) has proven healthy.
                    still_lost = {event.device for event in self._lost()}
                    for name in sorted(lost - still_lost):
                        yield HealthEvent(
                            name, "lost", message="NVML reads the GPU again", healthy=True
                        )
                    lost &= still_lost
        finally:
            nvml.nvmlEventSetFree(event_set)

    def _lost(self) -> Iterator[HealthEvent]:
        for gpu in self._gpus.values():
            try:
                self.nvml.nvmlDeviceGetUUID(gpu.handle)
            except self.nvml.NVMLError:
                yield HealthEvent(gpu.device.name, "lost", message="NVML reports the GPU is lost")

    def _row_remap_failures(self) -> Iterator[HealthEvent]:
        for gpu in self._gpus.values():
            rows = _optional(self.nvml, self.nvml.nvmlDeviceGetRemappedRows, gpu.handle)
            if rows and rows[3]:
                yield HealthEvent(
                    gpu.device.name, "row-remap-failure", message="memory row remapping failed"
                )

    def sample(self) -> Sequence[DeviceSample]:
        nvml = self.nvml
        samples = []
        for gpu in self._gpus.values():
            handle = gpu.handle
            utilization = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
            power = _optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
            energy = _optional(nvml, nvml.nvmlDeviceGetTotalEnergyConsumption, handle)
            temperature = _optional(
                nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
            )
            corrected = _optional(
                nvml,
                nvml.nvmlDeviceGetTotalEccErrors,
                handle,
                nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                nvml.NVML_AGGREGATE_ECC,
            )
            uncorrected = _optional(
                nvml,
                nvml.nvmlDeviceGetTotalEccErrors,
                handle,
                nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                nvml.NVML_AGGREGATE_ECC,
            )
            # Per process, so the memory of each share of a shared GPU can be told apart.
            processes = _optional(nvml, nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
            samples.append(
                DeviceSample(
                    device=gpu.device.name,
                    utilization=utilization.gpu / 100 if utilization is not None else None,
                    memory_used_bytes=int(memory.used) if memory is not None else None,
                    memory_limit_bytes=int(memory.total) if memory is not None else None,
                    power_watts=power / 1000 if power is not None else None,
                    energy_joules=energy / 1000 if energy is not None else None,
                    temperature_celsius=float(temperature) if temperature is not None else None,
                    errors_corrected=corrected,
                    errors_uncorrected=uncorrected,
                    processes=tuple(
                        ProcessUsage(int(p.pid), int(p.usedGpuMemory))
                        for p in processes
                        if p.usedGpuMemory is not None
                    ),
                )
            )
        return samples


def classify(
    event_type: int,
    data: int,
    device: str,
    nvml: ModuleType,
    ignored_xids: frozenset[int] = frozenset(),
) -> HealthEvent | None:
    """An NVML event as a vendor-neutral health event (NVIDIA's application Xids keep the GPU healthy)."""
    if event_type == nvml.nvmlEventTypeXidCriticalError:
        return capabilities.xid_event(data, device, ignored_xids)
    if event_type == nvml.nvmlEventTypeDoubleBitEccError:
        return HealthEvent(device, "ecc-uncorrectable", "dbe", "double-bit ECC error")
    return None


def _xids(option: str) -> frozenset[int]:
    try:
        return frozenset(int(x) for x in option.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            "--backend-option", f"nvidia.ignore-xids={option}: expected Xid numbers such as 119,120"
        ) from None


def _import_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as err:
        raise BackendUnavailable(
            "nvidia-ml-py is not installed: pip install 'unidra[nvidia]'"
        ) from err
    module: ModuleType = pynvml
    return module


def _init(nvml: ModuleType) -> None:
    try:
        nvml.nvmlInit()
    except nvml.NVMLError_LibraryNotFound as err:
        raise BackendUnavailable(
            "NVML (libnvidia-ml.so.1) not found: install the NVIDIA driver, or mount its libraries into the container"
        ) from err
    except nvml.NVMLError_DriverNotLoaded as err:
        raise BackendUnavailable(
            "the NVIDIA kernel driver is not loaded: run `modprobe nvidia` or install the driver"
        ) from err
    except nvml.NVMLError_NoPermission as err:
        raise BackendUnavailable(
            "no permission to open the NVIDIA devices (/dev/nvidiactl): see docs/install.md"
        ) from err
    except nvml.NVMLError as err:
        raise BackendUnavailable(f"NVML failed to start: {err}") from err


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(nvml: ModuleType, call: Any, *args: Any) -> Any:
    """A query some GPUs or drivers do not support: None instead of an error."""
    try:
        return call(*args)
    except (
        nvml.NVMLError_NotSupported,
        nvml.NVMLError_FunctionNotFound,
        nvml.NVMLError_InvalidArgument,
    ):
        return None


def _optional_text(nvml: ModuleType, call: Any, *args: Any) -> str | None:
    value = _optional(nvml, call, *args)
    return _text(value) if value is not None else None
