"""Sharing an AMD GPU: processes time-share it, and a share's compute units become a CU mask.

ROCm has no MPS and no per-process memory cap: shares of one GPU time-share it, and memory is
only the scheduler's bookkeeping. Compute is held on CDNA (gfx9) GPUs, where the runtime honours
`HSA_CU_MASK`: a share that consumed compute units gets those units, disjoint from the other
shares', as the only CUs its queues may use. The mask is applied by the ROCm runtime of the
process, so it holds a cooperative workload to its share; a process that rewrites its own
environment can lift it. RDNA GPUs pair CUs into work-group processors, so masks are not used
there.
"""

from __future__ import annotations

from collections.abc import Sequence

from driver.model import (
    COMPUTE_UNITS,
    TIME_SLICING_ONLY,
    ContainerEdits,
    Device,
    Sharing,
    SharingSupport,
    Strategy,
)

# CU masks by index list, as documented for HSA_CU_MASK (`<gpu>:<ids>`), on gfx9 targets (CDNA).
_MASKED_TARGETS = "gfx9"
MASKED = SharingSupport(
    strategies=(Strategy.TIME_SLICING,),
    limits={Strategy.TIME_SLICING: frozenset({COMPUTE_UNITS})},
    unit_masks=True,
)


def support(device: Device) -> SharingSupport | None:
    """Whole GPUs time-share; CDNA ones also take CU masks. Compute partitions are not shared."""
    if device.partition_profile is not None:
        return None
    return (
        MASKED if (device.compute_target or "").startswith(_MASKED_TARGETS) else TIME_SLICING_ONLY
    )


def edits(sharing: Sharing) -> ContainerEdits:
    """`HSA_CU_MASK` for a share that holds compute units; the GPU is index 0 in its container."""
    if not sharing.units:
        return ContainerEdits()
    return ContainerEdits(env=(f"HSA_CU_MASK=0:{ranges(sharing.units)}",))


def ranges(units: Sequence[int]) -> str:
    """`0-15,32-47` for the sorted unit indices, in HSA_CU_MASK's ID_list syntax."""
    spans: list[list[int]] = []
    for unit in sorted(units):
        if spans and unit == spans[-1][1] + 1:
            spans[-1][1] = unit
        else:
            spans.append([unit, unit])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)
