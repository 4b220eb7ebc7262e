"""A fake `amdsmi` module replaying recorded answers (the real one cannot import without libamd_smi.so).

`install(recording)` puts it in sys.modules as `amdsmi`, so the backend's own lazy import finds
it. A recording lists one entry per processor handle with the dictionaries amdsmi returns:
`bdf`, `uuid`, `asic`, `vram`, `enumeration`, `kfd`, `numa`, `driver`, `vbios`, `xgmi`,
`computePartition`, `ecc`. Any value may be {"error": <status code>} to make that call raise
AmdSmiLibraryException, as amdsmi does. `notify(handle, event, message)` raises a reset or
thermal notification for the event readers.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "amd"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, code: int) -> None:
        super().__init__(f"amdsmi status {code}")
        self.err_code = code


class AmdSmiRetryException(AmdSmiLibraryException):
    pass


class AmdSmiTimeoutException(AmdSmiLibraryException):
    pass


class AmdSmiParameterException(AmdSmiException):
    pass


class AmdSmiEvtNotificationType(enum.IntEnum):
    VMFAULT = 1
    THERMAL_THROTTLE = 2
    GPU_PRE_RESET = 3
    GPU_POST_RESET = 4


class AmdSmiInitFlags(enum.IntEnum):
    INIT_ALL_PROCESSORS = 0xFFFFFFFF
    INIT_AMD_CPUS = 1
    INIT_AMD_GPUS = 2


def build(recording: dict[str, Any], init_error: int | None = None) -> types.ModuleType:
    module = types.ModuleType("amdsmi")
    state = {"recording": copy.deepcopy(recording), "initialised": False}

    def answer(handle: int, key: str) -> Any:
        if not state["initialised"]:
            raise AmdSmiLibraryException(32)  # AMDSMI_STATUS_NOT_INIT
        value = state["recording"]["processors"][handle][key]
        if isinstance(value, dict) and set(value) == {"error"}:
            raise AmdSmiLibraryException(value["error"])
        return copy.deepcopy(value)

    def amdsmi_init(flag: AmdSmiInitFlags = AmdSmiInitFlags.INIT_AMD_GPUS) -> None:
        if not isinstance(flag, AmdSmiInitFlags):
            raise AmdSmiException("flag must be an AmdSmiInitFlags member")
        if init_error is not None:
            raise AmdSmiLibraryException(init_error)
        state["initialised"] = True

    calls = {
        "amdsmi_get_gpu_device_bdf": "bdf",
        "amdsmi_get_gpu_device_uuid": "uuid",
        "amdsmi_get_gpu_asic_info": "asic",
        "amdsmi_get_gpu_vram_info": "vram",
        "amdsmi_get_gpu_enumeration_info": "enumeration",
        "amdsmi_get_gpu_kfd_info": "kfd",
        "amdsmi_topo_get_numa_node_number": "numa",
        "amdsmi_get_gpu_driver_info": "driver",
        "amdsmi_get_gpu_vbios_info": "vbios",
        "amdsmi_get_xgmi_info": "xgmi",
        "amdsmi_get_gpu_compute_partition": "computePartition",
        "amdsmi_get_gpu_total_ecc_count": "ecc",
    }
    for function, key in calls.items():
        setattr(module, function, lambda handle, key=key: answer(handle, key))
    notifications = threading.Condition()

    class AmdSmiEventReader:
        """Like amdsmi's: registers a mask per handle; `read` drains the process-wide queue."""

        def __init__(self, handle: int, event_types: list[AmdSmiEvtNotificationType]) -> None:
            if not all(isinstance(t, AmdSmiEvtNotificationType) for t in event_types):
                raise AmdSmiParameterException("event types must be AmdSmiEvtNotificationType")
            state["listening"][handle] = {t.name for t in event_types}

        def read(self, timeout_ms: int, num_elem: int = 10) -> list[dict[str, Any]]:
            with notifications:
                notifications.wait_for(lambda: state["queue"], timeout_ms / 1000)
                if not state["queue"]:
                    raise AmdSmiTimeoutException(8)  # AMDSMI_STATUS_TIMEOUT
                batch = state["queue"][:num_elem]
                del state["queue"][:num_elem]
                return batch

        def stop(self) -> None:
            state["listening"].clear()

    def notify(handle: int, event: str, message: str) -> None:
        """What the kernel driver would raise; dropped unless a reader asked for it."""
        with notifications:
            if event in state["listening"].get(handle, ()):
                state["queue"].append(
                    {"processor_handle": handle, "event": event, "message": message}
                )
                notifications.notify_all()

    state.update(listening={}, queue=[])
    module.AmdSmiEventReader = AmdSmiEventReader
    module.AmdSmiEvtNotificationType = AmdSmiEvtNotificationType
    module.AmdSmiRetryException = AmdSmiRetryException
    module.AmdSmiTimeoutException = AmdSmiTimeoutException
    module.AmdSmiParameterException = AmdSmiParameterException
    module.notify = notify  # tests raise notifications while the backend runs
    module.amdsmi_init = amdsmi_init
    module.amdsmi_shut_down = lambda: state.update(initialised=False)
    module.amdsmi_get_processor_handles = lambda: list(range(len(state["recording"]["processors"])))
    module.AmdSmiException = AmdSmiException
    module.AmdSmiLibraryException = AmdSmiLibraryException
    module.AmdSmiInitFlags = AmdSmiInitFlags
    module.state = state  # tests change answers while the backend runs
    return module


@contextlib.contextmanager
def install(recording: dict[str, Any], init_error: int | None = None) -> Iterator[types.ModuleType]:
    module = build(recording, init_error)
    saved = sys.modules.get("amdsmi")
    sys.modules["amdsmi"] = module
    try:
        yield module
    finally:
        if saved is None:
            sys.modules.pop("amdsmi", None)
        else:
            sys.modules["amdsmi"] = saved
