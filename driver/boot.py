"""The kernel's boot ID: what tells a restart of the driver from a reboot of the node."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

BOOT_ID = Path("proc/sys/kernel/random/boot_id")


def boot_id(host_root: Path) -> str:
    """The boot ID under the host root, else this process's own (the same kernel); "" if unreadable."""
    for path in (host_root / BOOT_ID, Path("/") / BOOT_ID):
        try:
            return path.read_text().strip()
        except OSError:
            continue
    log.warning("Cannot read the kernel's boot ID; a reboot will look like a restart")
    return ""
