"""The host as backends see it, under a root prefix: device-node numbers, /proc, and vendor CLIs.

The same code serves a container that mounts the host at /host and tests on fake trees. Device
numbers come from the real node when it exists, else from sysfs `dev` files (`226:128`), else
from /proc/devices, so CDI specs carry type, major and minor even where the runtime cannot stat.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

from driver.errors import BackendUnavailable
from driver.model import DeviceNode
from driver.reads import OptionalReads

log = logging.getLogger(__name__)


class Host:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.reads = OptionalReads(log)

    def path(self, absolute: str) -> Path:
        """A host path (`/sys/...`) under the root prefix."""
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str | Path, default: str | None = None) -> str | None:
        """A file's text, or `default` when it is absent; a file that is there but cannot be
        read (EACCES, EIO from a dead device) is logged once, then treated as absent."""
        path = absolute if isinstance(absolute, Path) else self.path(absolute)
        try:
            return path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return default
        except (OSError, UnicodeDecodeError) as err:
            self.reads.failed(str(path.parent), f"read {path.name}", err)
            return default

    def number(self, absolute: str | Path) -> int | None:
        """An integer sysfs file (`42`, `0x1a`), or None when it is missing or holds something else."""
        text = self.read(absolute)
        try:
            return int(text, 0) if text else None
        except ValueError:
            return int(text) if text and text.isdigit() else None

    def resolve(self, absolute: str) -> str | None:
        """The host path of the file `absolute` leads to, following links as the host would.

        An absolute link target means the host's /, not this process's: it is looked up under
        the root again. None when the file does not exist or the links loop.
        """
        parts = [p for p in absolute.split("/") if p]
        resolved: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part in (".", ".."):
                resolved = resolved[:-1] if part == ".." else resolved
                continue
            candidate = self.path("/" + "/".join([*resolved, part]))
            if not candidate.is_symlink():
                resolved.append(part)
                continue
            hops += 1
            if hops > 40:  # the kernel's own limit (ELOOP)
                return None
            target = os.readlink(candidate)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                resolved = []
        final = "/" + "/".join(resolved)
        return final if self.path(final).exists() else None

    def char_major(self, name: str) -> int | None:
        """The major number /proc/devices gives a character driver (dynamic majors differ per boot)."""
        text = self.read("/proc/devices") or ""
        in_char = False
        for line in text.splitlines():
            if line.startswith("Character devices"):
                in_char = True
            elif line.startswith("Block devices"):
                in_char = False
            elif in_char:
                number, _, driver = line.strip().partition(" ")
                if driver.strip() == name and number.isdigit():
                    return int(number)
        return None

    def device_node(
        self,
        path: str,
        *,
        sysfs_dev: str | Path | None = None,
        major_name: str | None = None,
        minor: int | None = None,
        permissions: str | None = None,
    ) -> DeviceNode | None:
        """A CDI device node for `path` (a path inside the container, the same as on the host)."""
        numbers = self._stat(path) or self._sysfs_numbers(sysfs_dev)
        if numbers is None and major_name is not None and minor is not None:
            major = self.char_major(major_name)
            numbers = (major, minor) if major is not None else None
        if numbers is None:
            return None
        return DeviceNode(
            path=path, type="c", major=numbers[0], minor=numbers[1], permissions=permissions
        )

    def drm_nodes(self, card: int, render: int) -> tuple[DeviceNode, DeviceNode] | None:
        """/dev/dri/card<card> and /dev/dri/renderD<render>, or None when either is missing."""
        primary = self.device_node(
            f"/dev/dri/card{card}", sysfs_dev=f"/sys/class/drm/card{card}/dev"
        )
        render_node = self.device_node(
            f"/dev/dri/renderD{render}", sysfs_dev=f"/sys/class/drm/renderD{render}/dev"
        )
        if primary is None or render_node is None:
            return None
        return primary, render_node

    def run(self, candidates: Sequence[str], args: Sequence[str], timeout: float, what: str) -> str:
        """Run the first of `candidates` (host paths of a vendor CLI) that exists; no shell involved."""
        for candidate in candidates:
            binary = self.path(candidate)
            if binary.is_file() and os.access(binary, os.X_OK):
                try:
                    done = subprocess.run(
                        [str(binary), *args],
                        capture_output=True,
                        text=True,
                        timeout=timeout,
                        check=False,
                    )
                except subprocess.TimeoutExpired as err:
                    raise BackendUnavailable(f"{what} did not answer within {timeout:g}s") from err
                if done.returncode != 0:
                    detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                    raise BackendUnavailable(
                        f"{what} failed with exit code {done.returncode}: {detail[0]}"
                    )
                return done.stdout
        raise BackendUnavailable(
            f"{what} not found (looked for {', '.join(candidates)}); install the vendor's tools"
        )

    def _stat(self, path: str) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path(path))
        except OSError:
            return None
        if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
            return os.major(info.st_rdev), os.minor(info.st_rdev)
        return None

    def _sysfs_numbers(self, sysfs_dev: str | Path | None) -> tuple[int, int] | None:
        if sysfs_dev is None:
            return None
        text = self.read(sysfs_dev)
        if not text or ":" not in text:
            return None
        major, _, minor = text.partition(":")
        try:
            return int(major), int(minor)
        except ValueError:
            return None
