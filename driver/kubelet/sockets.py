"""Socket paths kubelet expects and the 108-byte AF_UNIX limit.

Registration: `<registrar-dir>/<driver>-reg.sock`; DRA service: `<plugins-dir>/<driver>/dra.sock`.
With a pod UID (rolling upgrade) each instance gets its own: `<driver>-<uid>-reg.sock`,
`dra-<uid>.sock` and `control-<uid>.sock`. When a name would not fit, the UID is replaced by a short digest of it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from driver.errors import FatalError

# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def registration_socket(registrar_dir: Path, driver: str, pod_uid: str | None) -> Path:
    if not pod_uid:
        return _fitting(registrar_dir / f"{driver}-reg.sock")
    full = registrar_dir / f"{driver}-{pod_uid}-reg.sock"
    if _fits(full):
        return full
    return _fitting(registrar_dir / f"{driver}-{_short(pod_uid)}-reg.sock")


def dra_socket(plugin_dir: Path, pod_uid: str | None) -> Path:
    return _instance_socket(plugin_dir, "dra", pod_uid)


def control_socket(plugin_dir: Path, pod_uid: str | None) -> Path:
    """`unidra simulate` talks to every instance on the node through these."""
    return _instance_socket(plugin_dir, "control", pod_uid)


def control_sockets(plugin_dir: Path) -> list[Path]:
    return sorted(plugin_dir.glob("control*.sock"))


def _instance_socket(plugin_dir: Path, stem: str, pod_uid: str | None) -> Path:
    if not pod_uid:
        return _fitting(plugin_dir / f"{stem}.sock")
    full = plugin_dir / f"{stem}-{pod_uid}.sock"
    return full if _fits(full) else _fitting(plugin_dir / f"{stem}-{_short(pod_uid)}.sock")


def _short(pod_uid: str) -> str:
    digest = hashlib.sha256(pod_uid.encode()).digest()
    return base64.b32encode(digest).decode().lower()[:8]


def _fits(path: Path) -> bool:
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH


def _fitting(path: Path) -> Path:
    if not _fits(path):
        raise FatalError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow {MAX_SOCKET_PATH}. "
            "Use a shorter driver name or directory"
        )
    return path
