#!/usr/bin/env python3
"""Check one vendor backend on a real node (pass/fail), and record what the vendor stack answered.

    hack/smoke-<vendor> [--out FILE] [--host-root DIR] [--timeout SECONDS]

1. Records the vendor library's (or CLI's, or sysfs') answers in the format the test fakes
   replay (tests/support/nvml.py, amdsmi_fake.py, furiosa_fake.py; rbln-smi JSON; a sysfs
   snapshot for Intel GPU, Gaudi and TPU), into tests/fixtures/<vendor>/recorded-<host>.json.
2. Runs `unidra inspect` for that vendor, as a table and as ResourceSlices.
3. Runs the kubelet plugin against a test API server and a kubelet-like client and checks:
   at least one device is published with nonzero computeUnits; a claim on it prepares, every
   host path of its CDI spec exists and (NVIDIA) a CUDA container finds libcuda.so.1; the
   health monitor runs (NVIDIA: NVML events registered for every GPU); a metrics scrape has
   sampled series for every device; the claim unprepares. Prints one summary and exits
   non-zero on any failure.

Step 3 uses the repository's test API server and kubelet client (tests/support), so run this
from a checkout with the dev dependencies (`pip install -e '.[dev]'`); it writes only under a
temporary directory. Commit the recording as a new fixture and add a test that replays it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
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
            "serial": _try(N.nvmlDeviceGetSerial, h),
            "numGpuCores": _try(N.nvmlDeviceGetNumGpuCores, h),
            "cpuAffinity": _try(lambda h=h: _bits(N.nvmlDeviceGetCpuAffinity(h, 64))),
            "memoryAffinity": _try(
                lambda h=h: _bits(N.nvmlDeviceGetMemoryAffinity(h, 4, N.NVML_AFFINITY_SCOPE_NODE))
            ),
            "gpuInstanceProfiles": _gpu_instance_profiles(N, h),
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
        # What the CUDA driver API answers per GPU (replayed by tests/support/nvml.FakeCuda).
        "cudaMultiprocessors": _cuda_multiprocessors(host_root, [str(d["busId"]) for d in devices]),
    }


def _bits(words: Any) -> list[int]:
    return [
        i * 64 + bit for i, word in enumerate(words) for bit in range(64) if int(word) >> bit & 1
    ]


def _gpu_instance_profiles(nvml: Any, handle: Any) -> dict[str, Any]:
    """Every GPU instance profile index NVML answers (even with MIG off), as the fake replays them."""
    profiles = {}
    for index in range(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        info = _try(nvml.nvmlDeviceGetGpuInstanceProfileInfo, handle, index)
        if isinstance(info, dict):
            continue
        profiles[str(index)] = {
            name: (value.decode() if isinstance(value, bytes) else value)
            for name, _ in info._fields_
            if isinstance(value := getattr(info, name), int | bytes | str)
        }
    return profiles


def _cuda_multiprocessors(host_root: Path, bus_ids: list[str]) -> dict[str, Any]:
    from driver import pci
    from vendors.nvidia.cuda import CudaDriver

    cuda = CudaDriver()
    answers: dict[str, Any] = {}
    for bus_id in bus_ids:
        bdf = pci.normalize_bdf(bus_id)
        answers[bdf] = _try(cuda.multiprocessors, bdf)
    return answers


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


# -- the pass/fail check -------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    check: str
    passed: bool
    detail: str


def check_node(vendor: str, host_root: Path, timeout: float = 60.0) -> list[Result]:
    """Run the kubelet plugin for `vendor` in this process, against a test API server and a
    kubelet-like client, and check what a cluster would rely on.

    The API server and the kubelet client are the repository's test ones (tests/support/
    apiserver.py, kubelet.py, claims.py, container.py), so this needs a checkout of the
    repository, not only the installed package. Nothing outside a temporary directory is
    written: the CDI spec and sockets go there, not into /var/run/cdi or kubelet's folders.
    """
    sys.path.insert(0, str(REPO / "tests"))
    from driver import daemon
    from driver.demo.apiserver import ApiServer as FakeApiServer
    from driver.settings import Settings

    node = "smoke-node"
    work = Path(tempfile.mkdtemp(prefix="unidra-smoke-", dir="/tmp"))  # short: socket paths
    with FakeApiServer() as api:
        api.create("", "nodes", {"metadata": {"name": node}})
        settings = Settings(
            node_name=node,
            kubeconfig=api.write_kubeconfig(work / "kubeconfig"),
            cdi_root=work / "cdi",
            registrar_dir=work / "registry",
            plugins_dir=work / "plugins",
            backends=(vendor,),
            host_root=host_root,
            metrics_address="127.0.0.1:0",
            metrics_interval_seconds=1.0,
            healthcheck_port=None,
        ).validate()
        try:
            instance = daemon.start(settings)
        except Exception as err:
            return [Result("start", False, f"the kubelet plugin did not start: {err}")]
        try:
            return _checks(instance, api, settings, work, vendor, timeout)
        finally:
            instance.stop()


def _checks(
    instance: Any, api: Any, settings: Any, work: Path, vendor: str, timeout: float
) -> list[Result]:
    from driver.kubelet import client as kubelet

    try:
        plugin = kubelet.wait_for_registration(settings.registrar_dir)
    except Exception as err:
        return [Result("registration", False, f"kubelet could not register the plugin: {err}")]
    try:
        devices = _published(api, timeout)
        results = [_published_result(devices)]
        if devices:
            results.append(_prepared(plugin, api, settings, work, devices[0]["name"], vendor))
        results.append(_health(instance, vendor, timeout))
        results.append(_metrics(instance, [d["name"] for d in devices], timeout))
        return results
    finally:
        plugin.close()


def _published(api: Any, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        devices = [
            d
            for s in api.list("resource.k8s.io", "resourceslices")
            for d in s["spec"].get("devices") or []
        ]
        if devices or time.monotonic() > deadline:
            return devices
        time.sleep(0.2)


def _published_result(devices: list[dict[str, Any]]) -> Result:
    units = {
        d["name"]: d.get("capacity", {}).get("computeUnits", {}).get("value", "0") for d in devices
    }
    counted = sorted(name for name, value in units.items() if value not in ("", "0"))
    shown = ", ".join(f"{name} ({units[name]})" for name in sorted(units)) or "none"
    return Result(
        "published",
        bool(counted),
        f"{len(devices)} device(s) in ResourceSlices, {len(counted)} with compute units: {shown}",
    )


def _prepared(plugin: Any, api: Any, settings: Any, work: Path, device: str, vendor: str) -> Result:
    """Prepare a claim on one device: every host path of its CDI spec exists, and a container
    laid out from it finds the vendor's libraries; then unprepare it."""
    from driver import cdi
    from support import container
    from support.claims import allocated_claim, result

    claim = allocated_claim(api, "smoke", [result(device, settings.node_name, "gpu")])
    answer = plugin.prepare([claim])[claim[2]]
    if answer.error:
        return Result("prepared", False, f"prepare of {device} failed: {answer.error}")
    path = settings.cdi_root / cdi.spec_filename(settings.driver_name, claim[2])
    spec = json.loads(path.read_text())
    edits = [spec.get("containerEdits") or {}, *(d["containerEdits"] for d in spec["devices"])]
    host = settings.host_root
    missing = [
        item
        for edit in edits
        for item in [m["hostPath"] for m in edit.get("mounts") or []]
        + [n.get("hostPath") or n["path"] for n in edit.get("deviceNodes") or []]
        if not (host / item.lstrip("/")).exists()
    ]
    problems = [f"not on the host: {', '.join(missing)}"] if missing else []
    if not missing and vendor == "nvidia":
        seen = container.resolve(spec, host, work / "rootfs")
        for soname in ("libcuda.so.1", "libnvidia-ml.so.1"):
            if seen.find_library(soname) is None:
                problems.append(f"a CUDA container would not find {soname}")
        if seen.find_program("nvidia-smi") is None:
            problems.append("a CUDA container would not find nvidia-smi")
    undone = plugin.unprepare([claim])[claim[2]].error
    if undone or path.exists():
        problems.append(f"unprepare failed: {undone or 'the CDI spec is still there'}")
    mounts = sum(len(edit.get("mounts") or []) for edit in edits)
    detail = "; ".join(problems) or (
        f"{device}: every host path exists ({mounts} mounts), unprepared again"
    )
    return Result("prepared", not problems, detail)


def _health(instance: Any, vendor: str, timeout: float) -> Result:
    """The backend's health monitor runs; NVIDIA's has registered NVML events for every GPU."""
    backend = instance.inventory.current().backends.get(vendor)
    worker = instance.supervisor.workers.get(f"health-{vendor}")
    if backend is None or worker is None:
        return Result("health", False, f"no health monitor runs for {vendor}")
    deadline = time.monotonic() + timeout
    if vendor == "nvidia":
        gpus = {d.parent_uuid or d.uuid for d in instance.inventory.current().devices}
        while len(backend.registered_events) < len(gpus) and time.monotonic() < deadline:
            time.sleep(0.1)
        registered = {name: f"0x{mask:x}" for name, mask in backend.registered_events.items()}
        ok = len(registered) == len(gpus) and all(backend.registered_events.values())
        detail = f"NVML events registered for {len(registered)} of {len(gpus)} GPU(s): {registered}"
    else:
        time.sleep(min(2.0, timeout))
        ok = True
        detail = f"the {vendor} health monitor runs"
    if worker.restarts or not worker.thread.is_alive():
        ok, detail = False, f"the health monitor crashed {worker.restarts} time(s)"
    return Result("health", ok, detail)


def _metrics(instance: Any, devices: list[str], timeout: float) -> Result:
    """A Prometheus scrape has sampled series (utilisation, power, temperature...) for each device."""
    from prometheus_client.parser import text_string_to_metric_families

    sampled = (
        "hw_gpu_utilization_ratio",
        "hw_power_watts",
        "hw_temperature_celsius",
        "hw_energy_joules",
    )
    url = f"http://127.0.0.1:{instance.metrics_server.server_port}/metrics"
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        seen = {
            sample.labels.get("hw_id")
            for family in text_string_to_metric_families(text)
            if family.name in sampled
            for sample in family.samples
        }
        lacking = sorted(set(devices) - seen)
        if not lacking or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not devices:
        return Result("metrics", False, "no devices to scrape")
    if lacking:
        return Result("metrics", False, f"no sampled series for {', '.join(lacking)}")
    return Result("metrics", True, f"sampled series for all {len(devices)} device(s)")


def summary(vendor: str, results: list[Result]) -> str:
    lines = [f"{'PASS' if r.passed else 'FAIL'}  {r.check:<10} {r.detail}" for r in results]
    passed = sum(r.passed for r in results)
    verdict = "passed" if passed == len(results) and results else "FAILED"
    lines.append(f"smoke-{vendor}: {passed} of {len(results)} checks passed: {verdict}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vendor", choices=sorted(RECORDERS))
    parser.add_argument("--out", type=Path, help="where to write the recording")
    parser.add_argument(
        "--host-root", type=Path, default=Path(os.environ.get("UNIDRA_HOST_ROOT", "/"))
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds each check may wait (default 60)"
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
    subprocess.run(unidra, check=False)
    subprocess.run([*unidra, "--slices"], check=False, stdout=subprocess.DEVNULL)
    results = check_node(args.vendor, args.host_root, args.timeout)
    if recording is None:
        results.insert(0, Result("recorded", False, "the vendor stack could not be recorded"))
    print(summary(args.vendor, results))
    return 0 if results and all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
