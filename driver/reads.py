"""The rule every backend follows: only what names a device is required, every other read is optional.

An optional read that fails gives None, so the caller moves on to the next source in its fallback
chain (docs/backends.md lists each chain), and the failure is logged once per device and call:
rediscovery every minute does not repeat it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class OptionalReads:
    """One backend's optional reads, and the failures already logged."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def read(
        self,
        device: str,
        call: str,
        read: Callable[[], T],
        errors: tuple[type[BaseException], ...],
    ) -> T | None:
        """`read()`, or None when it raises one of `errors` (logged once for this device and call)."""
        try:
            return read()
        except errors as err:
            self.failed(device, call, err)
            return None

    def failed(self, device: str, call: str, error: object) -> None:
        """Log that `call` failed for `device`, unless that was logged before."""
        with self._lock:
            if (device, call) in self._seen:
                return
            self._seen.add((device, call))
        detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        self._log.warning(
            "Optional read failed; using its fallback",
            extra={"device": device, "call": call, "error": str(detail)},
        )


def first_known(*sources: Callable[[], T | None]) -> T | None:
    """The first source's answer that is not None, trying each only when the ones before said nothing."""
    for source in sources:
        value = source()
        if value is not None:
            return value
    return None
