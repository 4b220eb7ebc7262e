"""AMD Instinct and Radeon GPUs through amdsmi, or through sysfs and the KFD topology when amdsmi is missing.

`import amdsmi` loads libamd_smi.so at import time and fails (printing to stdout) without it, so
the import is lazy, silenced and caught; the sysfs reader then serves the same device model from
what the amdgpu kernel driver exposes. GPUs in a CPX/DPX/QPX compute-partition mode are
published as their partitions, each with its own render node.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from driver import pci
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from driver.model import (
    ContainerEdits,
    Device,
    DeviceSample,
    DeviceType,
    HealthEvent,
    Interconnect,
    Sharing,
    SharingSupport,
)
from driver.pci import PciMatch
from driver.reads import OptionalReads
from vendors.amd import sharing
from vendors.host import Host

log = logging.getLogger(__name__)

VENDOR_ID = 0x1002
POLL_SECONDS = 5.0
# gfx target -> (architecture, precisions)
_TARGETS = {
    "gfx950": ("cdna4", {"fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "fp4", "int8"}),
    "gfx942": ("cdna3", {"fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8"}),
    "gfx941": ("cdna3", {"fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8"}),
    "gfx940": ("cdna3", {"fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8"}),
    "gfx90a": ("cdna2", {"fp64", "fp32", "bf16", "fp16", "int8"}),
    "gfx908": ("cdna", {"fp64", "fp32", "bf16", "fp16", "int8"}),
    "gfx1100": ("rdna3", {"fp32", "bf16", "fp16", "int8", "int4"}),
    "gfx1201": ("rdna4", {"fp32", "bf16", "fp16", "fp8", "int8", "int4"}),
}


# amdsmi notification -> (kind, code, healthy). A reset makes the GPU unusable until it completes,
# and its completion is the recovery signal; a VM fault is the application's, like NVIDIA's Xid 31.
_NOTIFICATIONS = {
    "GPU_PRE_RESET": ("device-status", "reset", False),
    "GPU_POST_RESET": ("recovered", "reset", True),
    "THERMAL_THROTTLE": ("overheating", "thermal-throttle", False),
    "VMFAULT": ("application-error", "vm-fault", True),
}


@dataclass(frozen=True)
class _Gpu:
    """One AMD GPU (or compute partition) as either reader found it."""

    bdf: str
    uuid: str
    model: str
    target: str
    compute_units: int | None
    memory: int | None
    card: int
    render: int
    numa: int | None
    driver_version: str | None
    firmware: str | None
    hive: str | None
    partition_mode: str = "SPX"
    partition_index: int = 0
    handle: Any = field(default=None, compare=False)


class AmdBackend:
    name = "amd"
    pci_matches = (PciMatch(VENDOR_ID, classes=(0x0300, 0x0302, 0x0380, 0x1200)),)

    def __init__(self, context: BackendContext, amdsmi: ModuleType | None = None) -> None:
        self.host = Host(context.host_root)
        self.amdsmi = amdsmi if amdsmi is not None else _import_amdsmi()
        if self.amdsmi is not None:
            try:
                self.amdsmi.amdsmi_init(self.amdsmi.AmdSmiInitFlags.INIT_AMD_GPUS)
            except self.amdsmi.AmdSmiException as err:
                log.info("amdsmi cannot start; reading sysfs instead", extra={"reason": str(err)})
                self.amdsmi = None
        if self.amdsmi is None and not self.host.path("/sys/module/amdgpu").exists():
            raise BackendUnavailable(
                "the amdgpu kernel driver is not loaded (no /sys/module/amdgpu): install ROCm's amdgpu-dkms"
            )
        self._gpus: dict[str, tuple[Device, _Gpu]] = {}
        self.reads = OptionalReads(log)
        self.poll_seconds = float(context.options.get("poll-seconds", POLL_SECONDS))

    @property
    def source(self) -> str:
        return "amdsmi" if self.amdsmi is not None else "sysfs"

    def discover(self) -> Sequence[Device]:
        gpus = _partitions_told_apart(
            self._read_amdsmi() if self.amdsmi is not None else self._read_sysfs()
        )
        hives: dict[str, list[str]] = {}
        for gpu in gpus:
            if gpu.hive:
                hives.setdefault(gpu.hive, []).append(gpu.uuid)
        found: dict[str, tuple[Device, _Gpu]] = {}
        for gpu in gpus:
            architecture, precisions = _TARGETS.get(gpu.target, ("unknown", {"fp32"}))
            partitioned = gpu.partition_mode.upper() != "SPX"
            members = hives.get(gpu.hive or "", [])
            device = Device(
                backend=self.name,
                vendor="amd",
                type=DeviceType.GPU,
                model=gpu.model,
                architecture=architecture,
                uuid=gpu.uuid,
                index=len(found),
                memory_bytes=gpu.memory,
                compute_units=gpu.compute_units,
                pci_bus_id=gpu.bdf,
                pcie_root=pci.pcie_root(self.host.root, gpu.bdf),
                numa_node=gpu.numa,
                driver_version=gpu.driver_version,
                firmware_version=gpu.firmware,
                compute_target=gpu.target,
                precisions=frozenset(precisions),
                interconnect=Interconnect("xgmi", f"xgmi-hive-{gpu.hive}")
                if gpu.hive and len(members) > 1
                else None,
                peers=tuple(u for u in members if u != gpu.uuid) if len(members) > 1 else (),
                extra={"gpu.amd.com/productName": gpu.model[:64]},
                partition_profile=gpu.partition_mode.lower() if partitioned else None,
                name_suffix=f"{gpu.partition_mode.lower()}-{gpu.partition_index}"
                if partitioned
                else "",
            )
            found[device.name] = (device, gpu)
        self._gpus = found
        return [device for device, _ in found.values()]

    def device_edits(self, device: Device) -> ContainerEdits:
        gpu = self._gpu(device)
        nodes = self.host.drm_nodes(gpu.card, gpu.render)
        if nodes is None:
            raise BackendUnavailable(
                f"{device.name}: DRM nodes card{gpu.card}/renderD{gpu.render} not found"
            )
        return ContainerEdits(device_nodes=nodes)

    def shared_edits(self, devices: Sequence[Device]) -> ContainerEdits:
        kfd = self.host.device_node("/dev/kfd", sysfs_dev="/sys/class/kfd/kfd/dev")
        if kfd is None:
            raise BackendUnavailable(
                "/dev/kfd not found: the amdgpu driver has no compute (KFD) support loaded"
            )
        return ContainerEdits(device_nodes=(kfd,))

    def sharing_support(self, device: Device) -> SharingSupport | None:
        return sharing.support(device)

    def sharing_edits(self, device: Device, share: Sharing) -> ContainerEdits:
        return sharing.edits(share)

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        """amdsmi's reset and thermal notifications as they arrive, and new uncorrectable ECC (RAS)
        errors polled every few seconds."""
        seen = {device.name: self._uncorrectable(gpu) for device, gpu in self._gpus.values()}
        return self._watch(seen, self._event_readers(), stop)

    def _watch(
        self, seen: dict[str, int | None], readers: list[Any], stop: threading.Event
    ) -> Iterator[HealthEvent]:
        next_ecc = time.monotonic() + self.poll_seconds
        try:
            while not stop.is_set():
                if readers:
                    yield from self._notifications(readers[0], min(self.poll_seconds, 1.0))
                elif stop.wait(self.poll_seconds):
                    return
                if time.monotonic() >= next_ecc:
                    next_ecc = time.monotonic() + self.poll_seconds
                    yield from self._new_ecc_errors(seen)
        finally:
            for reader in readers:
                with contextlib.suppress(Exception):
                    reader.stop()

    def _event_readers(self) -> list[Any]:
        """One notification reader per GPU handle; empty without amdsmi or its event support."""
        smi = self.amdsmi
        if smi is None or not hasattr(smi, "AmdSmiEventReader"):
            return []
        kinds = [
            smi.AmdSmiEvtNotificationType[name]
            for name in _NOTIFICATIONS
            if name in smi.AmdSmiEvtNotificationType.__members__
        ]
        readers = []
        for handle in {
            _handle_key(gpu.handle): gpu.handle for _, gpu in self._gpus.values()
        }.values():
            try:
                try:
                    readers.append(smi.AmdSmiEventReader(handle, kinds))
                except smi.AmdSmiParameterException:  # amdsmi before 6.2 takes the types as *args
                    readers.append(smi.AmdSmiEventReader(handle, *kinds))
            except smi.AmdSmiException as err:
                log.info("amdsmi event notifications unavailable", extra={"reason": str(err)})
                return readers
        return readers

    def _notifications(self, reader: Any, timeout: float) -> Iterator[HealthEvent]:
        """amdsmi's notification queue is per process: any reader returns every GPU's events."""
        smi = self.amdsmi
        assert smi is not None
        try:
            notifications = reader.read(int(timeout * 1000))
        except (smi.AmdSmiTimeoutException, smi.AmdSmiRetryException):
            return
        for notification in notifications:
            mapped = _NOTIFICATIONS.get(str(notification.get("event")))
            if mapped is None:
                continue
            kind, code, healthy = mapped
            handle = _handle_key(notification.get("processor_handle"))
            message = str(notification.get("message") or "").strip() or code
            for device, gpu in list(self._gpus.values()):
                if _handle_key(gpu.handle) == handle:
                    yield HealthEvent(device.name, kind, code, f"amdsmi: {message}", healthy)

    def _new_ecc_errors(self, seen: dict[str, int | None]) -> Iterator[HealthEvent]:
        for device, gpu in list(self._gpus.values()):
            count = self._uncorrectable(gpu)
            before = seen.get(device.name)
            seen[device.name] = count
            if count is not None and before is not None and count > before:
                yield HealthEvent(
                    device.name,
                    "ecc-uncorrectable",
                    str(count),
                    f"{count - before} new uncorrectable ECC errors",
                )

    def sample(self) -> Sequence[DeviceSample]:
        return [self._sample(device, gpu) for device, gpu in self._gpus.values()]

    # -- amdsmi --------------------------------------------------------------------------------

    def _read_amdsmi(self) -> list[_Gpu]:
        """amdsmi names each GPU (PCI address, render node); sysfs and KFD answer what amdsmi cannot."""
        smi = self.amdsmi
        assert smi is not None
        kfd_nodes = self._kfd_nodes()
        gpus = []
        for handle in smi.amdsmi_get_processor_handles():
            try:
                bdf = pci.normalize_bdf(str(smi.amdsmi_get_gpu_device_bdf(handle)))
            except smi.AmdSmiException as err:
                log.warning("Skipping an AMD GPU amdsmi cannot name", extra={"error": str(err)})
                continue
            gpu = self._amdsmi_gpu(smi, handle, bdf, kfd_nodes)
            if gpu is not None:
                gpus.append(gpu)
        return gpus

    def _amdsmi_gpu(
        self, smi: ModuleType, handle: Any, bdf: str, kfd_nodes: dict[int, dict[str, str]]
    ) -> _Gpu | None:
        errors = (smi.AmdSmiException, KeyError, TypeError, ValueError, AttributeError)

        def read(call: str, key: str | None = None) -> Any:
            def answer() -> Any:
                value = getattr(smi, call)(handle)
                return value[key] if key else value

            value = self.reads.read(bdf, call, answer, errors)
            return None if isinstance(value, str) and _known(value) is None else value

        function = pci.read(self.host.root, bdf)
        asic = _mapping(read("amdsmi_get_gpu_asic_info"))
        enumeration = _mapping(read("amdsmi_get_gpu_enumeration_info"))
        card, render = (
            _integer(enumeration.get("drm_card")),
            _integer(enumeration.get("drm_render")),
        )
        if card is None or render is None:
            card, render = _drm_minors(function)
        if card is None or render is None:
            log.warning("Skipping an AMD GPU without DRM nodes", extra={"pci": bdf})
            return None
        node = kfd_nodes.get(render, {})
        numa = pci.parse_numa(read("amdsmi_topo_get_numa_node_number"))
        return _Gpu(
            bdf=bdf,
            uuid=_known(read("amdsmi_get_gpu_device_uuid")) or _kfd_uuid(node) or "",
            model=_known(asic.get("market_name")) or self._model(function),
            target=_known(asic.get("target_graphics_version")) or _kfd_target(node),
            compute_units=_integer(asic.get("num_compute_units")) or _kfd_units(node),
            memory=(_integer(read("amdsmi_get_gpu_vram_info", "vram_size")) or 0) * (1 << 20)
            or self._memory(function, node),
            card=card,
            render=render,
            numa=numa if numa is not None else function.numa_node if function else None,
            driver_version=_known(read("amdsmi_get_gpu_driver_info", "driver_version"))
            or self._driver_version(),
            firmware=_known(read("amdsmi_get_gpu_vbios_info", "part_number"))
            or self._sysfs_text(function, "vbios_version"),
            hive=_hive(read("amdsmi_get_xgmi_info", "xgmi_hive_id"))
            or _hive(self._sysfs_text(function, "xgmi_hive_info/xgmi_hive_id")),
            partition_mode=_mode(read("amdsmi_get_gpu_compute_partition"))
            or _mode(self._sysfs_text(function, "current_compute_partition"))
            or "SPX",
            partition_index=_integer(read("amdsmi_get_gpu_kfd_info", "current_partition_id")) or 0,
            handle=handle,
        )

    # -- sysfs and KFD ------------------------------------------------------------------------------

    def _read_sysfs(self) -> list[_Gpu]:
        """What the amdgpu driver shows: the PCI function and its DRM nodes name a GPU, the rest is optional."""
        functions = pci.select(pci.scan(self.host.root), self.pci_matches)
        kfd_nodes = self._kfd_nodes()
        gpus = []
        for function in functions:
            if function.driver != "amdgpu":
                continue
            card, render = _drm_minors(function)
            if card is None or render is None:
                log.warning("AMD GPU without DRM nodes", extra={"pci": function.bdf})
                continue
            node = kfd_nodes.get(render, {})
            gpus.append(
                _Gpu(
                    bdf=function.bdf,
                    uuid=_kfd_uuid(node) or function.bdf,
                    model=self._model(function),
                    target=_kfd_target(node),
                    compute_units=_kfd_units(node),
                    memory=self._memory(function, node),
                    card=card,
                    render=render,
                    numa=function.numa_node,
                    driver_version=self._driver_version(),
                    firmware=self._sysfs_text(function, "vbios_version"),
                    hive=_hive(self._sysfs_text(function, "xgmi_hive_info/xgmi_hive_id")),
                    partition_mode=_mode(self._sysfs_text(function, "current_compute_partition"))
                    or "SPX",
                )
            )
        return gpus

    def _kfd_nodes(self) -> dict[int, dict[str, str]]:
        """KFD topology nodes of GPUs, by DRM render minor; unreadable nodes are left out."""
        nodes = {}
        for properties in sorted(
            self.host.path("/sys/class/kfd/kfd/topology/nodes").glob("*/properties")
        ):
            text = self.host.read(properties) or ""
            values = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
            if (_integer(values.get("simd_count")) or 0) > 0:  # CPU nodes have no SIMDs
                memory = self.host.read(properties.parent / "mem_banks/0/properties") or ""
                for line in memory.splitlines():
                    if line.startswith("size_in_bytes "):
                        values["local_mem_size"] = line.split()[1]
                render = _integer(values.get("drm_render_minor"))
                if render is not None:
                    nodes[render] = values
        return nodes

    def _model(self, function: pci.PciFunction | None) -> str:
        name = self._sysfs_text(function, "product_name")
        if name:
            return name
        return f"AMD GPU 0x{function.device:04x}" if function else "AMD GPU"

    def _memory(self, function: pci.PciFunction | None, node: dict[str, str]) -> int | None:
        return _integer(node.get("local_mem_size")) or _integer(
            self._sysfs_text(function, "mem_info_vram_total")
        )

    def _driver_version(self) -> str | None:
        return self.host.read("/sys/module/amdgpu/version") or self.host.read(
            "/proc/sys/kernel/osrelease"
        )

    def _sysfs_text(self, function: pci.PciFunction | None, name: str) -> str | None:
        return _known(self.host.read(function.sysfs / name)) if function else None

    # -- helpers ------------------------------------------------------------------------------------

    def _gpu(self, device: Device) -> _Gpu:
        entry = self._gpus.get(device.name)
        if entry is None:
            raise BackendUnavailable(f"{device.name} is no longer present")
        return entry[1]

    def _uncorrectable(self, gpu: _Gpu) -> int | None:
        """New uncorrectable ECC errors; an answer that cannot be read is logged once and None."""
        if self.amdsmi is not None and gpu.handle is not None:
            smi = self.amdsmi
            return _integer(
                self.reads.read(
                    gpu.bdf,
                    "amdsmi_get_gpu_total_ecc_count",
                    lambda: smi.amdsmi_get_gpu_total_ecc_count(gpu.handle)["uncorrectable_count"],
                    (smi.AmdSmiException, KeyError, TypeError),
                )
            )
        text = self.host.read(f"/sys/bus/pci/devices/{gpu.bdf}/ras/umc_err_count")
        for line in (text or "").splitlines():
            if line.startswith("ue:"):
                return _integer(line.split(":")[1].strip())
        return None

    def _sample(self, device: Device, gpu: _Gpu) -> DeviceSample:
        base = self.host.path(f"/sys/bus/pci/devices/{gpu.bdf}")
        busy = self.host.number(base / "gpu_busy_percent")
        hwmon = next(iter(sorted(base.glob("hwmon/hwmon*"))), None)
        power = self.host.number(hwmon / "power1_average") if hwmon else None
        temperature = self._die_temperature(hwmon) if hwmon else None
        return DeviceSample(
            device=device.name,
            utilization=busy / 100 if busy is not None else None,
            memory_used_bytes=self.host.number(base / "mem_info_vram_used"),
            memory_limit_bytes=gpu.memory,
            power_watts=power / 1e6 if power is not None else None,
            temperature_celsius=temperature / 1000 if temperature is not None else None,
            errors_uncorrected=self._uncorrectable(gpu),
        )

    def _die_temperature(self, hwmon: Path) -> int | None:
        """Millidegrees of the edge sensor, else the junction (hotspot) one: MI300-class GPUs
        are documented to report no edge temperature (AMD's exporter reads junction there)."""
        labelled = {
            self.host.read(label): label.with_name(label.name.replace("_label", "_input"))
            for label in sorted(hwmon.glob("temp*_label"))
        }
        for sensor in ("edge", "junction"):
            if sensor in labelled and (value := self.host.number(labelled[sensor])) is not None:
                return value
        return None if labelled else self.host.number(hwmon / "temp1_input")


def _handle_key(handle: Any) -> Any:
    """amdsmi hands out handles as ctypes pointers but reports them in events as plain integers."""
    return getattr(handle, "value", handle)


def _import_amdsmi() -> ModuleType | None:
    """amdsmi, or None: it raises KeyError/OSError at import without libamd_smi.so and prints to stdout."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import amdsmi
    except (ImportError, KeyError, OSError) as err:
        log.info(
            "amdsmi unavailable; reading sysfs instead",
            extra={"reason": f"{type(err).__name__}: {err}"},
        )
        return None
    module: ModuleType = amdsmi
    return module


def _drm_minors(function: pci.PciFunction | None) -> tuple[int | None, int | None]:
    """The card and render minors under the function's drm/ folder (what names its device nodes)."""
    drm = function.sysfs / "drm" if function else None
    if drm is None or not drm.is_dir():
        return None, None
    cards = sorted(int(p.name[4:]) for p in drm.glob("card*") if p.name[4:].isdigit())
    renders = sorted(int(p.name[7:]) for p in drm.glob("renderD*") if p.name[7:].isdigit())
    return (cards[0] if cards else None), (renders[0] if renders else None)


def _kfd_uuid(node: dict[str, str]) -> str | None:
    unique = _integer(node.get("unique_id"))
    return f"{unique:016x}" if unique else None


def _kfd_target(node: dict[str, str]) -> str:
    return _gfx(_integer(node.get("gfx_target_version")) or 0)


def _kfd_units(node: dict[str, str]) -> int | None:
    simds, per_cu = _integer(node.get("simd_count")), _integer(node.get("simd_per_cu"))
    return simds // per_cu or None if simds and per_cu else None


# The mode a count of compute partitions implies (MI300X: 8 XCDs, MI300A: 6 in CPX mode).
_MODE_BY_COUNT = {2: "DPX", 3: "TPX", 4: "QPX", 6: "CPX", 8: "CPX"}


def _partitions_told_apart(gpus: list[_Gpu]) -> list[_Gpu]:
    """Compute partitions of one GPU share its PCI address, and their mode and index are optional
    reads: a failed one must not give them one name. Their mode is then the one a sibling
    reported, else the one their count implies; their index, their rank by render node."""
    siblings: dict[str, list[_Gpu]] = {}
    for gpu in gpus:
        siblings.setdefault(gpu.bdf, []).append(gpu)
    told = []
    for gpu in gpus:
        group = siblings[gpu.bdf]
        if len(group) == 1:
            told.append(gpu)
            continue
        modes = {g.partition_mode for g in group} - {"SPX"}
        mode = modes.pop() if len(modes) == 1 else _MODE_BY_COUNT.get(len(group), "CPX")
        indices = {g.partition_index for g in group}
        renders = sorted(g.render for g in group)
        index = gpu.partition_index if len(indices) == len(group) else renders.index(gpu.render)
        told.append(replace(gpu, partition_mode=mode, partition_index=index))
    return told


def _mode(value: Any) -> str | None:
    """A compute partition mode amdgpu knows (SPX, DPX, TPX, QPX, CPX), or None."""
    mode = str(value).strip().upper() if value is not None else ""
    return mode if mode in ("SPX", "DPX", "TPX", "QPX", "CPX") else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _integer(value: Any) -> int | None:
    try:
        return int(str(value).strip(), 0) if str(value).strip().startswith("0x") else int(value)
    except (TypeError, ValueError):
        return None


def _gfx(version: int) -> str:
    """KFD's gfx_target_version (90402) as a target name (gfx942)."""
    if not version:
        return "unknown"
    major, minor, step = version // 10000, (version // 100) % 100, version % 100
    return f"gfx{major}{minor:x}{step:x}"


def _known(value: Any) -> str | None:
    return None if value in (None, "", "N/A") else str(value)


def _hive(value: Any) -> str | None:
    if value in (None, "", "N/A", "0", 0, "0x0"):
        return None
    try:
        return f"{int(value, 16) if isinstance(value, str) else int(value):#018x}"
    except ValueError:
        return None
