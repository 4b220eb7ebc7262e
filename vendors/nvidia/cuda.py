"""The CUDA driver API (`libcuda.so.1`, through ctypes) for what NVML does not answer: a GPU's SM count.

On a real H200 `nvmlDeviceGetAttributes` is NotSupported for a whole GPU, while
`cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)` answers 132. The library is loaded on first use
only; devices are found by PCI address, because CUDA numbers GPUs in its own order.
`cuInit` creates no context, so no GPU memory is taken and no compute slot held.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
SONAME = "libcuda.so.1"


class CudaError(Exception):
    """A CUDA driver call failed, or the library could not be loaded."""


class SmCounter(Protocol):
    def multiprocessors(self, bdf: str) -> int:
        """The SM count of the GPU at `bdf`; CudaError when CUDA cannot tell."""
        ...


class CudaDriver:
    """libcuda.so.1, loaded by soname or from the driver's library folders, the first time it is asked."""

    def __init__(
        self,
        folders: Callable[[], Sequence[str]] = tuple,
        load: Callable[[str], Any] = ctypes.CDLL,
    ) -> None:
        self._folders = folders
        self._load = load
        self._lock = threading.Lock()
        self._library: Any = None
        self._failure: CudaError | None = None

    def multiprocessors(self, bdf: str) -> int:
        library = self._library_or_raise()
        device = ctypes.c_int()
        _check(
            library.cuDeviceGetByPCIBusId(ctypes.byref(device), bdf.encode()),
            "cuDeviceGetByPCIBusId",
        )
        count = ctypes.c_int()
        _check(
            library.cuDeviceGetAttribute(
                ctypes.byref(count), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device
            ),
            "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)",
        )
        return count.value

    def _library_or_raise(self) -> Any:
        with self._lock:
            if self._library is None and self._failure is None:
                try:
                    self._library = self._open()
                    _check(self._library.cuInit(0), "cuInit")
                except CudaError as err:
                    self._library, self._failure = None, err
            if self._failure is not None:
                raise self._failure
            return self._library

    def _open(self) -> Any:
        tried = []
        for candidate in (SONAME, *(f"{folder}/{SONAME}" for folder in self._folders())):
            try:
                return self._load(candidate)
            except OSError as err:
                tried.append(f"{candidate}: {err}")
        raise CudaError(f"cannot load {SONAME} ({'; '.join(tried)})")


def _check(result: int, call: str) -> None:
    if result != 0:
        raise CudaError(f"{call} returned CUresult {result}")
