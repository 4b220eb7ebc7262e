"""Unidra's error tree. The kubelet service turns these into per-claim errors; the daemon exits on FatalError.

UnidraError
 ├── ConfigError          bad user input (opaque config, profile file, flags); permanent
 ├── ClaimError           a claim cannot be prepared as allocated; permanent until it changes
 ├── RetryableError       API outage, lock held too long; kubelet retries the call
 │    └── StorageError    the node's disk refused: full, read-only, no permission; names the path
 ├── BackendUnavailable   a vendor backend cannot run on this machine; one-line reason
 └── FatalError           the daemon cannot continue
"""

from __future__ import annotations

import errno
import os


class UnidraError(Exception):
    """Base of every error Unidra raises on purpose."""


class ConfigError(UnidraError):
    """User input is invalid; `path` names the offending field."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


class ClaimError(UnidraError):
    """A ResourceClaim cannot be prepared as it stands."""


class RetryableError(UnidraError):
    """A transient failure; the same call may succeed later."""


class StorageError(RetryableError):
    """The node's disk refused a read or write (ENOSPC, EROFS, EACCES...): an operator fixes the node,
    then kubelet's retry succeeds. The message names the path and the cause."""

    @classmethod
    def from_os(cls, action: str, path: os.PathLike[str] | str, err: OSError) -> StorageError:
        """`cannot write /var/run/cdi/x.json: No space left on device (ENOSPC)`."""
        code = errno.errorcode.get(err.errno or 0)
        cause = err.strerror or str(err)
        return cls(f"cannot {action} {os.fspath(path)}: {cause}" + (f" ({code})" if code else ""))


class BackendUnavailable(UnidraError):
    """A backend cannot serve on this machine; the message is one line saying why and how to fix it."""


class FatalError(UnidraError):
    """The daemon must stop."""
