"""`unidra cleanup`: remove this driver's state from a node after uninstalling it.

Removes the driver's CDI specs, its plugin directory (checkpoint, lock file, sockets) and its
registration sockets; nothing of other drivers. Refuses while an instance still answers on its
control socket, because that instance would rewrite what is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from driver import cdi, control, socket_files
from driver.errors import UnidraError
from driver.kubelet import sockets


def running_instances(plugin_dir: Path) -> list[Path]:
    """Control sockets of instances that still answer."""
    alive = []
    for path in sockets.control_sockets(plugin_dir):
        with contextlib.suppress(UnidraError):
            control.request(path, {"command": "health"}, timeout=5)
            alive.append(path)
    return alive


def clean(
    *, driver: str, cdi_root: Path, plugins_dir: Path, registrar_dir: Path, force: bool = False
) -> list[Path]:
    """Remove the driver's node state; returns what was removed."""
    plugin_dir = plugins_dir / driver
    alive = running_instances(plugin_dir)
    if alive and not force:
        raise UnidraError(
            f"{len(alive)} Unidra instance(s) still running on this node ({alive[0]}); "
            "uninstall the DaemonSet first"
        )
    removed: list[Path] = []
    for path in sorted(cdi.claim_specs(cdi_root, driver).values()):
        path.unlink(missing_ok=True)
        removed.append(path)
    for path in sorted(registrar_dir.glob(f"{driver}-*reg.sock")):
        socket_files.remove_any(path)
        removed.append(path)
    if plugin_dir.is_dir() and not plugin_dir.is_symlink():
        # The directory may be a mount point of the cleanup pod: empty it rather than remove it.
        for entry in sorted(plugin_dir.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                os.unlink(entry)
            removed.append(entry)
    return removed
