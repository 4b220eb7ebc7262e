"""Unidra's error tree. The kubelet service turns these into per-claim errors; the daemon exits on FatalError.

UnidraError
 ├── ConfigError          bad user input (opaque config, profile file, flags); permanent
 ├── ClaimError           a claim cannot be prepared as allocated; permanent until it changes
 ├── RetryableError       API outage, lock held too long; kubelet retries the call
 ├── BackendUnavailable   a vendor backend cannot run on this machine; one-line reason
 └── FatalError           the daemon cannot continue
"""

from __future__ import annotations


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


class BackendUnavailable(UnidraError):
    """A backend cannot serve on this machine; the message is one line saying why and how to fix it."""


class FatalError(UnidraError):
    """The daemon must stop."""
