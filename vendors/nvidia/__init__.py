"""NVIDIA GPUs through NVML (nvidia-ml-py, module `pynvml`), with /proc, sysfs and CUDA for what NVML does not say.

Only what names a GPU is required: its PCI address (NVML), UUID and minor number (NVML, else
/proc/driver/nvidia/gpus/<bdf>/information). Every other read is optional, with the fallback
chains docs/backends.md lists; a real H200 answers NotSupported to nvmlDeviceGetAttributes
for a whole GPU, so its SM count comes from the CUDA driver API or from NVML's core count. A
GPU NVML has lost is still published, with what identifies it, and reported unhealthy.
pynvml imports cleanly without a driver; NVML is loaded at `nvmlInit`, so a node without the
library or kernel module gets a one-line reason. GPUs in MIG mode are published as their MIG
devices (the parent is not usable whole), named by profile and placement.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid as uuid_module
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

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
    Interconnect,
    OfferedProfile,
    ProcessUsage,
    Sharing,
    SharingSupport,
    name_token,
)
from driver.pci import PciMatch
from driver.reads import OptionalReads, first_known
from vendors.host import Host
from vendors.nvidia import capabilities, driver_files, topology
from vendors.nvidia.cuda import CudaDriver, CudaError, SmCounter
from vendors.nvidia.sharing import NvidiaSharing

log = logging.getLogger(__name__)

EVENT_WAIT_MS = 1000
ROW_REMAP_POLL_SECONDS = 30.0
CPU_SET_WORDS = 64  # 4096 CPUs, in 64-bit words
NODE_SET_WORDS = 4  # 256 NUMA nodes
MAX_MIG_DEVICES = 7  # the most GPU instances any GPU has, when NVML cannot say
T = TypeVar("T")


@dataclass
class _Info:
    """What discovery learnt about one GPU; every field but `bdf` may be unknown."""

    bdf: str
    index: int | None = None
    handle: Any = None
    uuid: str = ""
    minor: int | None = None
    name: str = ""
    memory: int | None = None
    architecture: str = "unknown"
    capability: tuple[int, int] | None = None
    multiprocessors: int | None = None
    numa: int | None = None
    vbios: str | None = None
    mig: bool = False
    links: topology.Links | None = None
    profiles: tuple[OfferedProfile, ...] = ()
    lost: str | None = None  # why the GPU cannot be used, when it cannot


@dataclass(frozen=True)
class _ProfileAttributes:
    """The fields of a GPU instance profile that a MIG device's own attributes would give (NVML's names)."""

    multiprocessorCount: int
    gpuInstanceSliceCount: int
    memorySizeMB: int

    @classmethod
    def of(cls, profile: Any) -> _ProfileAttributes:
        return cls(profile.multiprocessorCount, profile.sliceCount, profile.memorySizeMB)


@dataclass(frozen=True)
class _Gpu:
    device: Device
    handle: Any
    minor: int | None
    gpu_instance: int | None = None
    compute_instance: int | None = None
    parent_handle: Any = None  # the whole GPU's handle, for a MIG device


class NvidiaBackend:
    name = "nvidia"
    pci_matches = (PciMatch(0x10DE, classes=(0x0300, 0x0302)),)

    def __init__(
        self,
        context: BackendContext,
        nvml: ModuleType | None = None,
        cuda: SmCounter | None = None,
    ) -> None:
        self.host = Host(context.host_root)
        self.node_name = context.node_name
        self.ignored_xids = _xids(context.options.get("ignore-xids", ""))
        self.driver_root = driver_files.driver_root(context.options.get("driver-root"))
        self.nvml = nvml or _import_pynvml()
        _init(self.nvml)
        self.reads = OptionalReads(log)
        self.cuda: SmCounter = cuda or CudaDriver(self._cuda_folders)
        self._gpus: dict[str, _Gpu] = {}
        self._lost: dict[str, str] = {}
        self._files: driver_files.DriverFiles | None = None
        self._missing_said: list[str] = []
        # Device name -> the NVML event types registered for it (what the health monitor listens to).
        self.registered_events: dict[str, int] = {}
        self.sharing = NvidiaSharing(self.host, context.state_dir, self.driver_root or "/")

    # -- discovery -----------------------------------------------------------------------

    def discover(self) -> Sequence[Device]:
        nvml = self.nvml
        driver_version = first_known(
            lambda: self._system("nvmlSystemGetDriverVersion", nvml.nvmlSystemGetDriverVersion),
            lambda: driver_files.kernel_version(self.host),
        )
        cuda = self._system("nvmlSystemGetCudaDriverVersion", nvml.nvmlSystemGetCudaDriverVersion)
        cuda_version = (
            f"{cuda // 1000}.{(cuda % 1000) // 10}.0" if isinstance(cuda, int) and cuda else None
        )
        found = [
            info for index in range(nvml.nvmlDeviceGetCount()) if (info := self._describe(index))
        ]
        found += self._unlisted({info.bdf for info in found})
        # MIG instances cannot use NVLink peer-to-peer, so GPUs in MIG mode are not fabric members.
        links = topology.domains([i.links for i in found if i.links and not i.mig])
        gpus: dict[str, _Gpu] = {}
        lost: dict[str, str] = {}
        for info in found:
            interconnect = links.get(info.uuid) if info.uuid else None
            device = Device(
                backend=self.name,
                vendor="nvidia",
                type=DeviceType.GPU,
                model=info.name,
                architecture=info.architecture,
                uuid=info.uuid,
                index=info.index,
                memory_bytes=info.memory,
                compute_units=info.multiprocessors,
                pci_bus_id=info.bdf,
                pcie_root=pci.pcie_root(self.host.root, info.bdf),
                numa_node=info.numa,
                driver_version=driver_version,
                firmware_version=info.vbios,
                compute_capability=f"{info.capability[0]}.{info.capability[1]}"
                if info.capability
                else None,
                compute_target=f"sm_{info.capability[0]}{info.capability[1]}"
                if info.capability
                else None,
                precisions=capabilities.precisions(info.capability),
                interconnect=Interconnect("nvlink", interconnect[0]) if interconnect else None,
                peers=interconnect[1] if interconnect else (),
                extra={"gpu.nvidia.com/productName": info.name[:64]}
                | ({"gpu.nvidia.com/cudaDriverVersion": cuda_version} if cuda_version else {}),
                offered_profiles=info.profiles,
            )
            if info.lost:
                lost[device.name] = info.lost
            if info.mig and not info.lost:
                for mig in self._mig_devices(info, device):
                    gpus[mig.device.name] = mig
            else:
                gpus[device.name] = _Gpu(device, info.handle, info.minor)
        for name, why in sorted(lost.items()):
            if name not in self._lost:  # said once, not at every rediscovery
                log.warning("NVIDIA GPU published as lost", extra={"device": name, "reason": why})
        self._gpus, self._lost = gpus, lost
        if self._files is not None and self._files.missing():
            self._files = None  # look again: a driver container may have finished installing
        return [gpu.device for gpu in gpus.values()]

    def _describe(self, index: int) -> _Info | None:
        """One GPU NVML lists: its identity, then every optional read with its fallbacks."""
        nvml = self.nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            bdf = pci.normalize_bdf(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
        except nvml.NVMLError as err:
            # Without a PCI address NVML cannot name the GPU; the sysfs sweep still reports it.
            log.warning("NVML cannot name an NVIDIA GPU", extra={"index": index, "error": str(err)})
            return None
        info = _Info(bdf=bdf, handle=handle)
        proc = self._proc_info(bdf)

        def read(call: str, answer: Callable[[], T]) -> T | None:
            return self._read(info, call, answer)

        info.uuid = (
            first_known(
                lambda: read("nvmlDeviceGetUUID", lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
                lambda: proc.get("GPU UUID"),
            )
            or ""
        )
        info.minor = first_known(
            lambda: read("nvmlDeviceGetMinorNumber", lambda: nvml.nvmlDeviceGetMinorNumber(handle)),
            lambda: _number(proc.get("Device Minor")),
        )
        if not info.uuid or info.minor is None:
            info.lost = (
                info.lost or "neither NVML nor /proc/driver/nvidia tell its UUID and minor number"
            )
        info.index = first_known(
            lambda: read("nvmlDeviceGetIndex", lambda: nvml.nvmlDeviceGetIndex(handle)),
            lambda: index,
        )
        info.name = first_known(
            lambda: read("nvmlDeviceGetName", lambda: _text(nvml.nvmlDeviceGetName(handle))),
            lambda: proc.get("Model"),
        ) or self._pci_model(bdf)
        info.memory = read(
            "nvmlDeviceGetMemoryInfo", lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        )
        capability = read(
            "nvmlDeviceGetCudaComputeCapability",
            lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle),
        )
        info.capability = (int(capability[0]), int(capability[1])) if capability else None
        info.architecture = capabilities.architecture(
            read("nvmlDeviceGetArchitecture", lambda: nvml.nvmlDeviceGetArchitecture(handle)),
            info.capability,
        )
        info.vbios = read(
            "nvmlDeviceGetVbiosVersion", lambda: _text(nvml.nvmlDeviceGetVbiosVersion(handle))
        )
        mig_mode = read("nvmlDeviceGetMigMode", lambda: nvml.nvmlDeviceGetMigMode(handle))
        # Without the mode, MIG devices that exist say the GPU is in MIG mode.
        info.mig = (
            mig_mode[0] == nvml.NVML_DEVICE_MIG_ENABLE
            if mig_mode is not None
            else any(self._mig_handles(info))
        )
        info.numa = self._numa(info)
        if not info.mig:
            info.multiprocessors = self._multiprocessors(info)
            if mig_mode is not None and info.memory:
                info.profiles = self._offered_profiles(info)
        if info.uuid:
            info.links = self._links(info)
        return info

    def _read(self, info: _Info, call: str, answer: Callable[[], T]) -> T | None:
        """An optional NVML read: None on any NVML error (logged once); GpuIsLost marks the GPU lost."""
        try:
            return answer()
        except self.nvml.NVMLError as err:
            self._failed(info, call, err)
            return None

    def _failed(self, info: _Info, call: str, err: Exception) -> None:
        if isinstance(err, self.nvml.NVMLError_GpuIsLost) and info.lost is None:
            info.lost = f"{call}: {err}"
        self.reads.failed(info.bdf, call, err)

    def _system(self, call: str, answer: Callable[[], Any]) -> Any:
        value = self.reads.read("system", call, answer, (self.nvml.NVMLError,))
        return _text(value) if isinstance(value, bytes) else value

    def _multiprocessors(self, info: _Info) -> int | None:
        """SMs: CUDA's count, else NVML's device attributes, else NVML's core count per SM."""
        nvml, handle = self.nvml, info.handle
        per_sm = capabilities.cores_per_sm(info.capability)
        return first_known(
            lambda: self.reads.read(
                info.bdf,
                "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)",
                lambda: self.cuda.multiprocessors(info.bdf) or None,
                (CudaError,),
            ),
            lambda: self._read(
                info,
                "nvmlDeviceGetAttributes",
                lambda: int(nvml.nvmlDeviceGetAttributes(handle).multiprocessorCount) or None,
            ),
            lambda: self._read(
                info,
                "nvmlDeviceGetNumGpuCores",
                lambda: (
                    int(nvml.nvmlDeviceGetNumGpuCores(handle)) // per_sm or None if per_sm else None
                ),
            ),
        )

    def _numa(self, info: _Info) -> int | None:
        """NVML's NUMA id, sysfs numa_node, NVML's memory affinity, then the node of its local CPUs."""
        nvml, handle = self.nvml, info.handle
        sysfs = self.host.path(f"/sys/bus/pci/devices/{info.bdf}")
        return first_known(
            lambda: pci.parse_numa(
                self._read(
                    info, "nvmlDeviceGetNumaNodeId", lambda: nvml.nvmlDeviceGetNumaNodeId(handle)
                )
            ),
            lambda: pci.numa_node(sysfs),
            lambda: _single(
                self._read(
                    info,
                    "nvmlDeviceGetMemoryAffinity",
                    lambda: _bits(
                        nvml.nvmlDeviceGetMemoryAffinity(
                            handle, NODE_SET_WORDS, nvml.NVML_AFFINITY_SCOPE_NODE
                        )
                    ),
                )
            ),
            lambda: pci.numa_of_cpus(
                self.host.root,
                self._read(
                    info,
                    "nvmlDeviceGetCpuAffinity",
                    lambda: _bits(nvml.nvmlDeviceGetCpuAffinity(handle, CPU_SET_WORDS)),
                )
                or frozenset(),
            ),
            lambda: pci.numa_of_cpus(self.host.root, pci.local_cpus(sysfs)),
        )

    def _offered_profiles(self, info: _Info) -> tuple[OfferedProfile, ...]:
        """The GPU instance profiles NVML offers, even with MIG mode off: the ground for creating MIG
        instances at prepare, which is not built yet, so they are shown by inspect and never published."""
        nvml = self.nvml
        profiles = []
        for index in range(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                profile = nvml.nvmlDeviceGetGpuInstanceProfileInfo(info.handle, index)
            except (nvml.NVMLError_NotSupported, nvml.NVMLError_InvalidArgument):
                continue  # a profile this GPU does not have
            except nvml.NVMLError as err:
                self.reads.failed(info.bdf, "nvmlDeviceGetGpuInstanceProfileInfo", err)
                break
            if not profile.instanceCount:
                continue
            name = _text(profile.name).removeprefix("MIG ") or capabilities.mig_profile_name(
                profile.sliceCount, profile.memorySizeMB, info.memory or 0
            )
            profiles.append(
                OfferedProfile(
                    name=name,
                    instances=int(profile.instanceCount),
                    compute_units=int(profile.multiprocessorCount) or None,
                    memory_bytes=int(profile.memorySizeMB) << 20 or None,
                )
            )
        return tuple(profiles)

    def _links(self, info: _Info) -> topology.Links:
        nvml, handle = self.nvml, info.handle
        gpu_peers: list[str] = []
        switches: list[str] = []
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            try:
                if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                    continue
                remote = pci.normalize_bdf(
                    _text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
                )
            except (nvml.NVMLError_NotSupported, nvml.NVMLError_InvalidArgument):
                continue  # a link this GPU does not have
            except nvml.NVMLError as err:
                self._failed(info, "nvmlDeviceGetNvLinkState", err)
                break
            kind = self._read(
                info,
                "nvmlDeviceGetNvLinkRemoteDeviceType",
                functools.partial(nvml.nvmlDeviceGetNvLinkRemoteDeviceType, handle, link),
            )
            (switches if kind == topology.SWITCH else gpu_peers).append(remote)
        return topology.Links(
            info.uuid, info.bdf, tuple(gpu_peers), tuple(sorted(set(switches))), self._fabric(info)
        )

    def _fabric(self, info: _Info) -> str | None:
        nvml = self.nvml
        fabric = nvml.c_nvmlGpuFabricInfoV_t()
        try:
            nvml.nvmlDeviceGetGpuFabricInfoV(info.handle, nvml.byref(fabric))
        except nvml.NVMLError_NotSupported:
            return None  # no NVLink fabric: a PCIe GPU (a real H200 answers state 0 instead)
        except nvml.NVMLError as err:
            self._failed(info, "nvmlDeviceGetGpuFabricInfoV", err)
            return None
        if (
            fabric.state != nvml.NVML_GPU_FABRIC_STATE_COMPLETED
            or fabric.status != nvml.NVML_SUCCESS
        ):
            return None
        cluster = bytes(fabric.clusterUuid)
        if not any(cluster):
            return None
        return f"{uuid_module.UUID(bytes=cluster)}.{fabric.cliqueId}"

    def _unlisted(self, listed: set[str]) -> list[_Info]:
        """GPUs the nvidia kernel driver holds but NVML did not name (fallen off the bus, unreadable)."""
        infos = []
        for function in pci.select(pci.scan(self.host.root), self.pci_matches):
            if function.bdf in listed or function.driver != "nvidia":
                continue
            proc = self._proc_info(function.bdf)
            if proc.get("GPU Excluded", "").lower().startswith("yes"):
                continue  # excluded on purpose (NVreg_ExcludedGpus): not ours to report
            infos.append(
                _Info(
                    bdf=function.bdf,
                    uuid=proc.get("GPU UUID", ""),
                    minor=_number(proc.get("Device Minor")),
                    name=proc.get("Model") or self._pci_model(function.bdf),
                    numa=function.numa_node,
                    lost="the nvidia driver holds it but NVML does not list it",
                )
            )
        return infos

    def _proc_info(self, bdf: str) -> dict[str, str]:
        """/proc/driver/nvidia/gpus/<bdf>/information: Model, GPU UUID, Device Minor, GPU Excluded."""
        text = self.host.read(f"/proc/driver/nvidia/gpus/{bdf}/information") or ""
        return {
            key.strip(): value.strip()
            for key, _, value in (line.partition(":") for line in text.splitlines())
            if value.strip()
        }

    def _pci_model(self, bdf: str) -> str:
        function = pci.read(self.host.root, bdf)
        return f"NVIDIA GPU 0x{function.device:04x}" if function else "NVIDIA GPU"

    def _mig_handles(self, info: _Info) -> Iterator[tuple[int, Any]]:
        """(slot, handle) of every MIG device on the GPU; 7 slots when NVML cannot say how many."""
        nvml, handle = self.nvml, info.handle
        count = self._read(
            info,
            "nvmlDeviceGetMaxMigDeviceCount",
            lambda: nvml.nvmlDeviceGetMaxMigDeviceCount(handle),
        )
        for slot in range(MAX_MIG_DEVICES if count is None else count):
            try:
                yield slot, nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:
                continue  # an empty slot (NotFound), or no MIG at all

    def _mig_devices(self, info: _Info, parent: Device) -> Iterator[_Gpu]:
        """The MIG devices that exist on a GPU in MIG mode, named by their UUID and GPU/compute
        instance (their identity); their profile, memory and SM count are optional."""
        nvml = self.nvml
        for slot, mig in self._mig_handles(info):
            try:
                mig_uuid = _text(nvml.nvmlDeviceGetUUID(mig))
                gi_id = nvml.nvmlDeviceGetGpuInstanceId(mig)
                ci_id = nvml.nvmlDeviceGetComputeInstanceId(mig)
                instance = nvml.nvmlGpuInstanceGetInfo(
                    nvml.nvmlDeviceGetGpuInstanceById(info.handle, gi_id)
                )
            except nvml.NVMLError as err:
                log.warning(
                    "NVML cannot name a MIG device",
                    extra={"gpu": parent.name, "slot": slot, "error": str(err)},
                )
                continue
            device = self._mig_device(info, parent, mig, mig_uuid, instance)
            yield _Gpu(device, mig, info.minor, gi_id, ci_id, parent_handle=info.handle)

    def _mig_device(
        self, info: _Info, parent: Device, mig: Any, mig_uuid: str, instance: Any
    ) -> Device:
        """A MIG device keeps its profile's SM count and memory: NVML's attributes of its handle,
        else those of the GPU instance profile it was made from, which also names the profile."""
        nvml = self.nvml
        made_from = self._read(
            info,
            "nvmlDeviceGetGpuInstanceProfileInfoById",
            lambda: nvml.nvmlDeviceGetGpuInstanceProfileInfoById(info.handle, instance.profileId),
        )
        attributes = self._read(
            info, "nvmlDeviceGetAttributes", lambda: nvml.nvmlDeviceGetAttributes(mig)
        ) or (_ProfileAttributes.of(made_from) if made_from else None)
        memory = self._read(
            info, "nvmlDeviceGetMemoryInfo", lambda: int(nvml.nvmlDeviceGetMemoryInfo(mig).total)
        ) or (int(attributes.memorySizeMB) << 20 if attributes else None)
        profile = (_text(made_from.name).removeprefix("MIG ") if made_from else None) or (
            capabilities.mig_profile_name(
                attributes.gpuInstanceSliceCount, attributes.memorySizeMB, parent.memory_bytes
            )
            if attributes and parent.memory_bytes
            else None
        )
        where = instance.placement.start
        return Device(
            backend=self.name,
            vendor="nvidia",
            type=DeviceType.GPU,
            model=parent.model,
            architecture=parent.architecture,
            uuid=mig_uuid,
            index=parent.index,
            memory_bytes=memory,
            compute_units=(int(attributes.multiprocessorCount) or None) if attributes else None,
            pci_bus_id=parent.pci_bus_id,
            pcie_root=parent.pcie_root,
            numa_node=parent.numa_node,
            driver_version=parent.driver_version,
            firmware_version=parent.firmware_version,
            compute_capability=parent.compute_capability,
            compute_target=parent.compute_target,
            precisions=parent.precisions,
            extra=parent.extra,
            partition_profile=profile or "unknown",
            parent_uuid=parent.uuid,
            name_suffix=f"mig-{name_token(profile or 'unknown')}-{where}",
        )

    # -- container edits ---------------------------------------------------------------------

    def device_edits(self, device: Device) -> ContainerEdits:
        gpu = self._gpus.get(device.name)
        if gpu is None:
            raise BackendUnavailable(f"{device.name} is no longer present")
        if device.name in self._lost or gpu.minor is None:
            raise BackendUnavailable(f"{device.name} cannot be used: {self._lost.get(device.name)}")
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
        mounts, hooks = driver_files.container_edits(self.host, self.driver_files())
        # "void" keeps a legacy nvidia-container-runtime hook from adding every GPU of the node.
        return ContainerEdits(
            env=("NVIDIA_VISIBLE_DEVICES=void",),
            device_nodes=tuple(nodes),
            mounts=mounts,
            hooks=hooks,
        )

    def driver_files(self) -> driver_files.DriverFiles:
        """The driver's libraries and binaries on the host: found at first use, and again after a
        rediscovery while some were missing (a driver upgrade restarts the plugin anyway)."""
        if self._files is None:
            version = self._system(
                "nvmlSystemGetDriverVersion", self.nvml.nvmlSystemGetDriverVersion
            )
            self._files = driver_files.locate(self.host, version, self.driver_root)
            missing = self._files.missing()
            # Said once per set of missing files (lookups repeat at every rediscovery): there is
            # no fallback, so it is an error, not a failed optional read.
            if missing and missing != self._missing_said:
                self._missing_said = missing
                log.error(
                    "NVIDIA driver files not found: CUDA containers given a GPU would fail to load "
                    "them. Name the driver's install root with --backend-option "
                    "nvidia.driver-root=<dir> (the GPU Operator's /run/nvidia/driver: add "
                    "manifests/components/nvidia-gpu-operator)",
                    extra={
                        "missing": ", ".join(missing),
                        "searched": "the loader cache, "
                        + ", ".join(
                            [self._files.root]
                            + ([] if self.driver_root else list(driver_files.KNOWN_ROOTS))
                        ),
                    },
                )
        return self._files

    def _cuda_folders(self) -> list[str]:
        return [str(self.host.path(folder)) for folder in self.driver_files().library_folders]

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

    # -- sharing (vendors/nvidia/sharing.py) ----------------------------------------------------

    def sharing_support(self, device: Device) -> SharingSupport | None:
        return self.sharing.support(device)

    def sharing_edits(self, device: Device, sharing: Sharing) -> ContainerEdits:
        return self.sharing.edits(device, sharing)

    def apply_sharing(self, device: Device, state: DeviceSharing | None) -> None:
        self.sharing.apply(device, state)

    # -- health and metrics --------------------------------------------------------------------

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        """NVML events (Xid, double-bit ECC, GPU lost), GPUs lost at discovery, and a periodic row-remapping check."""
        nvml = self.nvml
        wanted = nvml.nvmlEventTypeXidCriticalError | nvml.nvmlEventTypeDoubleBitEccError
        event_set = nvml.nvmlEventSetCreate()
        by_uuid: dict[str, str] = {}
        try:
            wholes: dict[str, _Gpu] = {}
            for gpu in self._gpus.values():
                if gpu.handle is not None and gpu.device.name not in self._lost:
                    wholes.setdefault(gpu.device.parent_uuid or gpu.device.uuid, gpu)
            for uuid, gpu in wholes.items():
                handle = gpu.parent_handle if gpu.parent_handle is not None else gpu.handle
                by_uuid[uuid] = gpu.device.name
                try:
                    supported = nvml.nvmlDeviceGetSupportedEventTypes(handle)
                    nvml.nvmlDeviceRegisterEvents(handle, wanted & supported, event_set)
                    self.registered_events[gpu.device.name] = wanted & supported
                except nvml.NVMLError as err:
                    yield HealthEvent(
                        gpu.device.name,
                        "unmonitored",
                        message=f"NVML cannot deliver events for this GPU: {err}",
                        healthy=True,
                    )
            lost: set[str] = set()
            for lost_event in self._lost_events():  # lost at discovery: said at once
                lost.add(lost_event.device)
                yield lost_event
            next_poll = time.monotonic() + ROW_REMAP_POLL_SECONDS
            yield from self._row_remap_failures()
            while not stop.is_set():
                try:
                    data = nvml.nvmlEventSetWait_v2(event_set, EVENT_WAIT_MS)
                except nvml.NVMLError_Timeout:
                    data = None
                except nvml.NVMLError_GpuIsLost:
                    for lost_event in self._lost_events():
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
                    still_lost = set()
                    for event in self._lost_events():
                        still_lost.add(event.device)
                        if event.device not in lost:
                            yield event
                    # A lost GPU that answers again (after a reset) has proven healthy.
                    for name in sorted(lost - still_lost):
                        yield HealthEvent(
                            name, "lost", message="NVML reads the GPU again", healthy=True
                        )
                    lost = still_lost
        finally:
            nvml.nvmlEventSetFree(event_set)

    def _lost_events(self) -> Iterator[HealthEvent]:
        """GPUs lost since discovery (their UUID no longer reads), and those found lost at discovery."""
        for gpu in list(self._gpus.values()):
            why = self._lost.get(gpu.device.name)
            if why is None:
                try:
                    self.nvml.nvmlDeviceGetUUID(gpu.handle)
                    continue
                except self.nvml.NVMLError as err:
                    why = f"nvmlDeviceGetUUID: {err}"
            yield HealthEvent(
                gpu.device.name, "lost", message=f"NVML reports the GPU is lost ({why})"
            )

    def _row_remap_failures(self) -> Iterator[HealthEvent]:
        for name, gpu in list(self._gpus.items()):
            if gpu.handle is None:
                continue
            rows = self.reads.read(
                name,
                "nvmlDeviceGetRemappedRows",
                functools.partial(self.nvml.nvmlDeviceGetRemappedRows, gpu.handle),
                (self.nvml.NVMLError,),
            )
            if rows and rows[3]:
                yield HealthEvent(name, "row-remap-failure", message="memory row remapping failed")

    def sample(self) -> Sequence[DeviceSample]:
        return [
            self._sample(name, gpu.handle) if gpu.handle is not None else DeviceSample(device=name)
            for name, gpu in list(self._gpus.items())
        ]

    def _sample(self, name: str, handle: Any) -> DeviceSample:
        nvml = self.nvml

        def read(call: str, answer: Callable[[], T]) -> T | None:
            return self.reads.read(name, call, answer, (nvml.NVMLError,))

        def ecc(kind: int) -> int | None:
            return read(
                "nvmlDeviceGetTotalEccErrors",
                lambda: nvml.nvmlDeviceGetTotalEccErrors(handle, kind, nvml.NVML_AGGREGATE_ECC),
            )

        utilization = read(
            "nvmlDeviceGetUtilizationRates", lambda: nvml.nvmlDeviceGetUtilizationRates(handle)
        )
        memory = read("nvmlDeviceGetMemoryInfo", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        power = read("nvmlDeviceGetPowerUsage", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        energy = read(
            "nvmlDeviceGetTotalEnergyConsumption",
            lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle),
        )
        temperature = read(
            "nvmlDeviceGetTemperature",
            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        )
        # Per process, so the memory of each share of a shared GPU can be told apart.
        processes = read(
            "nvmlDeviceGetComputeRunningProcesses",
            lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle),
        )
        return DeviceSample(
            device=name,
            utilization=utilization.gpu / 100 if utilization is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            memory_limit_bytes=int(memory.total) if memory is not None else None,
            power_watts=power / 1000 if power is not None else None,
            energy_joules=energy / 1000 if energy is not None else None,
            temperature_celsius=float(temperature) if temperature is not None else None,
            errors_corrected=ecc(nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            errors_uncorrected=ecc(nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            processes=tuple(
                ProcessUsage(int(p.pid), int(p.usedGpuMemory))
                for p in processes or ()
                if p.usedGpuMemory is not None
            ),
        )


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


def _number(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _bits(words: Any) -> frozenset[int]:
    """The set bits of NVML's affinity bitmask (an array of 64-bit words)."""
    return frozenset(
        word * 64 + bit
        for word, value in enumerate(words)
        for bit in range(64)
        if int(value) >> bit & 1
    )


def _single(members: frozenset[int] | None) -> int | None:
    return next(iter(members)) if members and len(members) == 1 else None
