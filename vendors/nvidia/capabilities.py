"""What an NVIDIA GPU can do, from NVML's architecture and CUDA compute capability; pure functions."""

from __future__ import annotations

import math

from driver.model import HealthEvent

# NVML_DEVICE_ARCH_* values.
_ARCHITECTURES = {
    2: "kepler",
    3: "maxwell",
    4: "pascal",
    5: "volta",
    6: "turing",
    7: "ampere",
    8: "ada",
    9: "hopper",
    10: "blackwell",
    13: "rubin",
}


def architecture(nvml_arch: int | None, capability: tuple[int, int] | None) -> str:
    """Normalized architecture name; falls back to the compute capability for unknown NVML values."""
    if nvml_arch in _ARCHITECTURES:
        return _ARCHITECTURES[nvml_arch]
    if capability is None:
        return "unknown"
    major, minor = capability
    if major >= 10:
        return "blackwell"
    by_capability = {
        (9, 0): "hopper",
        (8, 9): "ada",
        (7, 5): "turing",
        (7, 0): "volta",
        (7, 2): "volta",
    }
    if (major, minor) in by_capability:
        return by_capability[(major, minor)]
    return {8: "ampere", 6: "pascal", 5: "maxwell", 3: "kepler"}.get(major, "unknown")


def cores_per_sm(capability: tuple[int, int] | None) -> int | None:
    """CUDA cores per streaming multiprocessor (what nvmlDeviceGetNumGpuCores counts), by compute capability.

    From NVIDIA's CUDA programming guide tables; an H200 (9.0) answers 16896 cores for its 132 SMs.
    """
    if capability is None:
        return None
    exact = {(6, 0): 64, (7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64}
    if capability in exact:
        return exact[capability]
    return {3: 192, 5: 128, 6: 128, 8: 128, 9: 128, 10: 128, 12: 128}.get(capability[0])


def precisions(capability: tuple[int, int] | None) -> frozenset[str]:
    """Precisions the GPU computes natively: tensor-core formats by compute capability (none when unknown)."""
    if capability is None:
        return frozenset()
    cc = capability
    found = {"fp64", "fp32"}
    if cc >= (6, 0):
        found.add("fp16")
    if cc >= (6, 1):
        found.add("int8")
    if (7, 5) <= cc < (9, 0):
        found.add("int4")  # Turing to Ada tensor cores; Hopper dropped int4
    if cc >= (8, 0):
        found |= {"tf32", "bf16"}
    if cc >= (8, 9):
        found.add("fp8")
    if cc >= (10, 0):
        found.add("fp4")
    return frozenset(found)


def mig_profile_name(slices: int, memory_mib: int, total_bytes: int) -> str:
    """The MIG profile name NVIDIA's tools show (`3g.40gb`), from slices and memory (go-nvlib's rule)."""
    fraction = math.ceil(8 * memory_mib * (1 << 20) / total_bytes) / 8
    gigabytes = round(fraction * math.ceil(total_bytes / (1 << 30)))
    return f"{slices}g.{gigabytes}gb"


def xid_is_application_error(xid: int, extra_ignored: frozenset[int] = frozenset()) -> bool:
    """Xids NVIDIA's own tools treat as the application's fault: the GPU stays healthy."""
    return xid in {13, 31, 43, 45, 68, 109} or xid in extra_ignored


def xid_event(xid: int, device: str, extra_ignored: frozenset[int] = frozenset()) -> HealthEvent:
    """An Xid as a vendor-neutral health event."""
    if xid_is_application_error(xid, extra_ignored):
        return HealthEvent(
            device, "application-error", str(xid), f"Xid {xid}: application error", healthy=True
        )
    if xid == 79:
        return HealthEvent(device, "lost", "79", "Xid 79: GPU has fallen off the bus")
    if xid in (48, 94, 95):
        return HealthEvent(
            device, "ecc-uncorrectable", str(xid), f"Xid {xid}: uncorrectable ECC error"
        )
    return HealthEvent(device, "xid", str(xid), f"Xid {xid}")
