"""`unidra cleanup`: remove this driver's state from a node after uninstalling it.

Removes the driver's CDI specs, its plugin directory (checkpoint, lock file, sockets) and its
registration sockets; nothing of other drivers. Refuses while an instance still answers on its
control socket, because that instance would rewrite what is removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from driver import cdi, control, socket_files
from driver.errors import UnidraError
from driver.kubelet import sockets


def clean(
    *,
    driver: str,
    cdi_root: Path,
    plugins_dir: Path,
    registrar_dir: Path,
    force: bool = False,
    dry_run: bool = False,
) -> list[Path]:
    """Remove the driver's node state; returns what was removed (with `dry_run`, what would be)."""
    plugin_dir = plugins_dir / driver
    alive = control.answering(sockets.control_sockets(plugin_dir))
    if alive and not force:
        raise UnidraError(
            f"{len(alive)} Unidra instance(s) still running on this node ({alive[0]}); "
            "uninstall the DaemonSet first"
        )
    specs = sorted(cdi.claim_specs(cdi_root, driver).values())
    registrations = sorted(registrar_dir.glob(f"{driver}-*reg.sock"))
    # The plugin directory may be a mount point of the cleanup pod: empty it rather than remove it.
    owned = (
        sorted(plugin_dir.iterdir()) if plugin_dir.is_dir() and not plugin_dir.is_symlink() else []
    )
    if dry_run:
        return [*specs, *registrations, *owned]
    for path in specs:
        path.unlink(missing_ok=True)
    for path in registrations:
        socket_files.remove_any(path)
    for entry in owned:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            os.unlink(entry)
    return [*specs, *registrations, *owned]
