"""A fake `furiosa_smi` module (the 2026.4 API) replaying a recording; device files follow the real RNGD layout."""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "furiosa"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def device_files(index: int) -> list[str]:
    """Every /dev/rngd node of card `index`, as libfuriosa-kubernetes lists them."""
    names = [
        "mgmt",
        *(f"pe{i}" for i in range(8)),
        "pe0-1",
        "pe2-3",
        "pe4-5",
        "pe6-7",
        "pe0-3",
        "pe4-7",
    ]
    names += (
        [f"ch{i}" for i in range(8)]
        + [f"ch{i}r" for i in range(8)]
        + ["dmar", "bar0", "bar2", "bar4"]
    )
    return [f"/dev/rngd/npu{index}{name}" for name in names]


class SmiError(Exception):
    pass


class DeviceNotFoundError(SmiError):
    pass


class DeviceNotAvailableError(SmiError):
    pass


class IoError(SmiError):
    pass


class UnexpectedValueError(SmiError):
    pass


ERRORS = {
    e.__name__: e
    for e in (DeviceNotFoundError, DeviceNotAvailableError, IoError, UnexpectedValueError)
}


@dataclass(frozen=True)
class DeviceFile:
    path: str


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    in_use_bytes: int


@dataclass(frozen=True)
class Temperature:
    soc_peak: float
    ambient: float


@dataclass(frozen=True)
class VersionInfo:
    major: int
    minor: int
    patch: int


class FakeDevice:
    """One card; a recorded value {"error": "IoError"} makes that method raise, as furiosa-smi does."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __getattribute__(self, name: str) -> Any:
        data = object.__getattribute__(self, "data")
        key = {
            "memory_usage": "memory",
            "power_consumption": "power",
            "device_temperature": "temperature",
        }.get(name, name)
        value = data.get(key) if not name.startswith("_") else None
        if isinstance(value, dict) and set(value) == {"error"}:
            error = ERRORS[value["error"]]

            def fail(*args: Any) -> Any:
                raise error(f"{name}: {value['error']}")

            return fail
        return object.__getattribute__(self, name)

    def uuid(self) -> str:
        return str(self.data["uuid"])

    def bdf(self) -> str:
        return str(self.data["bdf"])

    def arch(self) -> str:
        return str(self.data["arch"])

    def product_name(self) -> str:
        return str(self.data["product_name"])

    def core_num(self) -> int:
        return int(self.data["core_num"])

    def numa_node(self) -> int:
        return int(self.data["numa_node"])

    def dev_node_index(self) -> int:
        return int(self.data["dev_node_index"])

    def firmware_version(self) -> str:
        return str(self.data["firmware_version"])

    def memory_usage(self) -> MemoryInfo:
        return MemoryInfo(**self.data["memory"])

    def device_files(self) -> list[DeviceFile]:
        # Its own call in furiosa-smi: it works while dev_node_index() fails.
        return [DeviceFile(path) for path in device_files(self.data["files_index"])]

    def liveness(self) -> bool:
        if self.data.get("gone"):
            raise DeviceNotFoundError("device not found")
        return bool(self.data["liveness"])

    def power_consumption(self) -> float:
        return float(self.data["power"])

    def device_temperature(self) -> Temperature:
        return Temperature(**self.data["temperature"])


@contextlib.contextmanager
def install(recording: dict[str, Any]) -> Iterator[types.ModuleType]:
    data = copy.deepcopy(recording)
    for device in data["devices"]:
        device["files_index"] = device["dev_node_index"]
    module = types.ModuleType("furiosa_smi")
    module.SmiError = SmiError
    for error in ERRORS.values():
        setattr(module, error.__name__, error)
    module.list_devices = lambda: [FakeDevice(d) for d in data["devices"]]

    def driver_info() -> VersionInfo:
        if set(data["driver"]) == {"error"}:
            raise ERRORS[data["driver"]["error"]]("driver_info")
        return VersionInfo(**data["driver"])

    module.driver_info = driver_info
    module.recording = data
    saved = sys.modules.get("furiosa_smi")
    sys.modules["furiosa_smi"] = module
    try:
        yield module
    finally:
        if saved is None:
            sys.modules.pop("furiosa_smi", None)
        else:
            sys.modules["furiosa_smi"] = saved
