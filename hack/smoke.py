#!/usr/bin/env python3
"""Smoke-test one vendor backend on a real node, and record what the vendor stack answered.

    hack/smoke-<vendor> [--out FILE] [--host-root DIR]

1. Records the vendor library's (or CLI's, or sysfs') answers in the format the test fakes
   replay (tests/support/nvml.py, amdsmi_fake.py, furiosa_fake.py; rbln-smi JSON; a sysfs
   snapshot for Intel GPU, Gaudi and TPU), into tests/fixtures/<vendor>/recorded-<host>.json.
2. Runs `unidra inspect` for that vendor, as a table and as ResourceSlices.

Commit the recording as a new fixture and add a test that replays it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _error_name(err: Exception) -> str:
    return type(err).__name__.removeprefix("NVMLError_")


def _try(call: Any, *args: Any) -> Any:
    """The answer, or {"error": name}: how the fakes replay a failing call."""
    try:
        value = call(*args)
    except Exception as err:
        return {"error": _error_name(err)}
    return value.decode() if isinstance(value, bytes) else value


def record_nvidia(host_root: Path) -> dict[str, Any]:
    import pynvml as N

    N.nvmlInit()
    devices = []
    for index in range(N.nvmlDeviceGetCount()):
        h = N.nvmlDeviceGetHandleByIndex(index)
        memory = _try(N.nvmlDeviceGetMemoryInfo, h)
        attributes = _try(N.nvmlDeviceGetAttributes, h)
        device: dict[str, Any] = {
            "index": _try(N.nvmlDeviceGetIndex, h),
            "uuid": _try(N.nvmlDeviceGetUUID, h),
            "name": _try(N.nvmlDeviceGetName, h),
            "minor": _try(N.nvmlDeviceGetMinorNumber, h),
            "busId": _try(lambda h=h: N.nvmlDeviceGetPciInfo(h).busId),
            "memory": memory
            if isinstance(memory, dict)
            else {"total": memory.total, "free": memory.free, "used": memory.used},
            "architecture": _try(N.nvmlDeviceGetArchitecture, h),
            "cudaComputeCapability": list(N.nvmlDeviceGetCudaComputeCapability(h)),
            "attributes": attributes
            if isinstance(attributes, dict)
            else {
                "multiprocessorCount": attributes.multiprocessorCount,
                "gpuInstanceSliceCount": attributes.gpuInstanceSliceCount,
                "memorySizeMB": attributes.memorySizeMB,
            },
            "numaNode": _try(N.nvmlDeviceGetNumaNodeId, h),
            "vbiosVersion": _try(N.nvmlDeviceGetVbiosVersion, h),
            "migMode": _try(N.nvmlDeviceGetMigMode, h),
            "nvlinks": [],
            "utilization": _try(
                lambda h=h: {
                    "gpu": N.nvmlDeviceGetUtilizationRates(h).gpu,
                    "memory": N.nvmlDeviceGetUtilizationRates(h).memory,
                }
            ),
            "powerUsage": _try(N.nvmlDeviceGetPowerUsage, h),
            "totalEnergyConsumption": _try(N.nvmlDeviceGetTotalEnergyConsumption, h),
            "temperature": _try(N.nvmlDeviceGetTemperature, h, N.NVML_TEMPERATURE_GPU),
            "eccErrors": _try(
                lambda h=h: {
                    "corrected": N.nvmlDeviceGetTotalEccErrors(h, 0, N.NVML_AGGREGATE_ECC),
                    "uncorrected": N.nvmlDeviceGetTotalEccErrors(h, 1, N.NVML_AGGREGATE_ECC),
                }
            ),
            "remappedRows": _try(lambda h=h: list(N.nvmlDeviceGetRemappedRows(h))),
            "supportedEventTypes": _try(N.nvmlDeviceGetSupportedEventTypes, h),
        }
        for link in range(N.NVML_NVLINK_MAX_LINKS):
            state = _try(N.nvmlDeviceGetNvLinkState, h, link)
            if isinstance(state, dict):
                continue
            device["nvlinks"].append(
                {
                    "link": link,
                    "state": state,
                    "remoteBusId": _try(
                        lambda h=h, link=link: N.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId
                    ),
                    "remoteDeviceType": _try(N.nvmlDeviceGetNvLinkRemoteDeviceType, h, link),
                }
            )
        info = N.c_nvmlGpuFabricInfoV_t()
        fabric = _try(N.nvmlDeviceGetGpuFabricInfoV, h, N.byref(info))
        device["fabric"] = (
            fabric
            if isinstance(fabric, dict)
            else {
                "clusterUuid": bytes(info.clusterUuid).hex(),
                "status": info.status,
                "cliqueId": info.cliqueId,
                "state": info.state,
            }
        )
        if isinstance(device["migMode"], list) and device["migMode"][0] == N.NVML_DEVICE_MIG_ENABLE:
            device["migDevices"] = []
            for slot in range(N.nvmlDeviceGetMaxMigDeviceCount(h)):
                try:
                    mig = N.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
                except N.NVMLError_NotFound:
                    continue
                gi = N.nvmlDeviceGetGpuInstanceId(mig)
                placement = N.nvmlGpuInstanceGetInfo(
                    N.nvmlDeviceGetGpuInstanceById(h, gi)
                ).placement
                m_memory, m_attributes = (
                    N.nvmlDeviceGetMemoryInfo(mig),
                    N.nvmlDeviceGetAttributes(mig),
                )
                device["migDevices"].append(
                    {
                        "slot": slot,
                        "uuid": _try(N.nvmlDeviceGetUUID, mig),
                        "gpuInstanceId": gi,
                        "computeInstanceId": N.nvmlDeviceGetComputeInstanceId(mig),
                        "placementStart": placement.start,
                        "placementSize": placement.size,
                        "memory": {
                            "total": m_memory.total,
                            "free": m_memory.free,
                            "used": m_memory.used,
                        },
                        "attributes": {
                            "multiprocessorCount": m_attributes.multiprocessorCount,
                            "gpuInstanceSliceCount": m_attributes.gpuInstanceSliceCount,
                            "memorySizeMB": m_attributes.memorySizeMB,
                        },
                    }
                )
        devices.append(device)
    cuda = _try(N.nvmlSystemGetCudaDriverVersion)
    return {
        "recordedWith": f"hack/smoke-nvidia on {socket.gethostname()}",
        "system": {"driverVersion": _try(N.nvmlSystemGetDriverVersion), "cudaDriverVersion": cuda},
        "devices": devices,
    }


def record_amd(host_root: Path) -> dict[str, Any]:
    import amdsmi as A

    A.amdsmi_init(A.AmdSmiInitFlags.INIT_AMD_GPUS)
    calls = {
        "bdf": A.amdsmi_get_gpu_device_bdf,
        "uuid": A.amdsmi_get_gpu_device_uuid,
        "asic": A.amdsmi_get_gpu_asic_info,
        "vram": A.amdsmi_get_gpu_vram_info,
        "enumeration": A.amdsmi_get_gpu_enumeration_info,
        "kfd": A.amdsmi_get_gpu_kfd_info,
        "numa": A.amdsmi_topo_get_numa_node_number,
        "driver": A.amdsmi_get_gpu_driver_info,
        "vbios": A.amdsmi_get_gpu_vbios_info,
        "xgmi": A.amdsmi_get_xgmi_info,
        "computePartition": A.amdsmi_get_gpu_compute_partition,
        "ecc": A.amdsmi_get_gpu_total_ecc_count,
    }
    processors = [
        {key: _json(_try(call, handle)) for key, call in calls.items()}
        for handle in A.amdsmi_get_processor_handles()
    ]
    return {"recordedWith": f"hack/smoke-amd on {socket.gethostname()}", "processors": processors}


def record_furiosa(host_root: Path) -> dict[str, Any]:
    import furiosa_smi as F

    driver = F.driver_info()
    devices = []
    for d in F.list_devices():
        memory, temperature = d.memory_usage(), d.device_temperature()
        devices.append(
            {
                "uuid": str(d.uuid()),
                "bdf": str(d.bdf()),
                "arch": str(d.arch()),
                "product_name": d.product_name(),
                "core_num": d.core_num(),
                "numa_node": d.numa_node(),
                "dev_node_index": d.dev_node_index(),
                "firmware_version": str(d.firmware_version()),
                "memory": {"total_bytes": memory.total_bytes, "in_use_bytes": memory.in_use_bytes},
                "power": d.power_consumption(),
                "temperature": {"soc_peak": temperature.soc_peak, "ambient": temperature.ambient},
                "liveness": d.liveness(),
                "device_files": [str(f.path) for f in d.device_files()],
            }
        )
    return {
        "recordedWith": f"hack/smoke-furiosa on {socket.gethostname()}",
        "driver": {"major": driver.major, "minor": driver.minor, "patch": driver.patch},
        "devices": devices,
    }


def record_rebellions(host_root: Path) -> dict[str, Any]:
    from driver.backends import BackendContext
    from vendors.rebellions import RebellionsBackend

    return RebellionsBackend(BackendContext(host_root=host_root)).read()


def record_sysfs(host_root: Path, vendor_ids: tuple[int, ...]) -> dict[str, Any]:
    """The sysfs files the Intel GPU, Gaudi and TPU backends read, for every function of these vendors."""
    from driver import pci

    files: dict[str, str] = {}
    links: dict[str, str] = {}
    for function in pci.scan(host_root):
        if function.vendor not in vendor_ids:
            continue
        base = function.sysfs.resolve()
        links[f"/sys/bus/pci/devices/{function.bdf}"] = "/" + str(base.relative_to(host_root))
        for path in base.rglob("*"):
            relative = "/" + str(path.relative_to(host_root))
            if path.is_symlink() and path.name in ("driver", "physfn", "iommu_group"):
                links[relative] = os.readlink(path)
            elif path.is_file() and path.stat().st_size < 4096 and path.name.isascii():
                try:
                    files[relative] = path.read_text()
                except (OSError, UnicodeDecodeError):
                    continue
    for pattern in (
        "sys/class/drm/*/dev",
        "sys/class/accel/*/dev",
        "sys/class/vfio/*/dev",
        "sys/module/*/version",
    ):
        for path in host_root.glob(pattern):
            files["/" + str(path.relative_to(host_root))] = path.read_text()
    return {
        "recordedWith": f"hack/smoke (sysfs) on {socket.gethostname()}",
        "files": files,
        "links": links,
    }


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


RECORDERS = {
    "nvidia": record_nvidia,
    "amd": record_amd,
    "furiosa": record_furiosa,
    "rebellions": record_rebellions,
    "intel-gpu": lambda root: record_sysfs(root, (0x8086,)),
    "gaudi": lambda root: record_sysfs(root, (0x1DA3,)),
    "tpu": lambda root: record_sysfs(root, (0x1AE0,)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vendor", choices=sorted(RECORDERS))
    parser.add_argument("--out", type=Path, help="where to write the recording")
    parser.add_argument(
        "--host-root", type=Path, default=Path(os.environ.get("UNIDRA_HOST_ROOT", "/"))
    )
    args = parser.parse_args()
    out = (
        args.out
        or REPO
        / "tests/fixtures"
        / args.vendor.replace("intel-gpu", "intel")
        / f"recorded-{socket.gethostname()}.json"
    )
    try:
        recording = RECORDERS[args.vendor](args.host_root)
    except Exception as err:
        print(f"recording failed: {type(err).__name__}: {err}", file=sys.stderr)
        recording = None
    if recording is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(recording, indent=1, default=str) + "\n")
        print(f"recorded the {args.vendor} stack's answers in {out}")
    unidra = [
        sys.executable,
        "-m",
        "driver",
        "inspect",
        "--vendors",
        args.vendor,
        "--host-root",
        str(args.host_root),
    ]
    status = subprocess.run(unidra, check=False).returncode
    status |= subprocess.run(
        [*unidra, "--slices"], check=False, stdout=subprocess.DEVNULL
    ).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
