"""Run as root in a fresh private mount namespace by tests/e2e/pod_layout.py: build a container's
view from a plan (a tmpfs root, binds, tmpfs volumes, read-only where asked), chroot into it and
exec the command. Standard library only: it runs before anything else is importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def enter(plan: Mapping[str, Any]) -> None:
    root = plan["root"]
    _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", root)
    for name, target in plan["links"].items():
        os.symlink(target, f"{root}/{name}")
    # Parents before children, so each mount point is made in what will hold it.
    for mount in sorted(plan["mounts"], key=lambda m: m["target"].count("/")):
        where = root + mount["target"]
        os.makedirs(where, exist_ok=True)
        if mount["source"]:
            _mount("--bind", mount["source"], where)
        else:
            _mount(
                "-t",
                "tmpfs",
                "-o",
                f"size={mount['size']}" if mount["size"] else "defaults",
                "tmpfs",
                where,
            )
        if mount["read_only"]:
            _mount("-o", "remount,bind,ro", where)
    if plan["read_only_root"]:
        _mount("-o", "remount,ro", root)
    os.chroot(root)
    os.chdir("/")
    os.execve(plan["argv"][0], plan["argv"], plan["env"])


if __name__ == "__main__":
    enter(json.loads(Path(sys.argv[1]).read_text()))
