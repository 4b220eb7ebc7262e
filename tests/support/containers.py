"""Run a shell in a real container with Debian's podman and runc, apart from the host's container state.

podman 4.3 reads CDI specs only from /etc/cdi and /var/run/cdi. So every run happens in a private
mount namespace (`unshare`) where a tmpfs covers /run and /dev/shm (and /etc/cdi if there is one),
and the test's CDI root is bound at /run/cdi. Images, run state, lock memory and events stay in a
temporary directory; the cgroups podman makes go under a parent of our own, removed at close.
The container's root is a busybox tree, so no image is pulled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

# The settings known to work on these machines (../shared/lab/README.md): runc, as crun refuses
# here; the cgroupfs manager; explicit ulimits. No network: the containers need none.
_CONTAINERS_CONF = """\
[containers]
netns = "none"
log_driver = "k8s-file"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{state}/events.log"
tmp_dir = "{state}/tmp"

[engine.runtimes]
runc = ["{runc}"]
"""
_STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = "{state}/storage"
runroot = "{state}/run"
"""
# Hide the host's CDI directories and podman's shared lock memory, then bind our CDI root.
_NAMESPACE = """\
mount -n -t tmpfs tmpfs /run
mount -n -t tmpfs tmpfs /dev/shm
if [ -d /etc/cdi ]; then mount -n -t tmpfs tmpfs /etc/cdi; fi
mkdir /run/cdi
mount -n --bind "$1" /run/cdi
shift
exec "$@"
"""
_TOOLS = ("podman", "runc", "busybox", "unshare")
TIMEOUT = 60


def unavailable() -> str:
    """Why podman cannot run containers here (one line), or "" if nothing is known to stop it."""
    if os.geteuid() != 0:
        return "podman runs rootful here and the test makes device nodes: run as root"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"{', '.join(missing)} not installed "
            "(apt-get install podman runc busybox-static util-linux)"
        )
    return ""


class Podman:
    """A private podman installation in `state`; `run` starts one container and returns its output."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.rootfs = state / "rootfs"
        for folder in ("bin", "dev", "proc", "sys"):
            (self.rootfs / folder).mkdir(parents=True)
        busybox = shutil.which("busybox")
        assert busybox is not None
        shutil.copy(busybox, self.rootfs / "bin" / "busybox")
        (self.rootfs / "bin" / "sh").symlink_to("busybox")
        runc = shutil.which("runc")
        (state / "containers.conf").write_text(_CONTAINERS_CONF.format(state=state, runc=runc))
        (state / "storage.conf").write_text(_STORAGE_CONF.format(state=state))
        self.cgroup_parent = f"unidra-test-{uuid.uuid4().hex[:12]}"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(state),
            "CONTAINERS_CONF": str(state / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(state / "storage.conf"),
        }

    def run(
        self, cdi_root: Path, devices: Sequence[str], script: str, args: Sequence[str] = ()
    ) -> str:
        """Run `sh -c script sh args...` in a container with these CDI devices; its stdout.

        A failing run raises AssertionError with podman's complaint.
        """
        argv = [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-ec", _NAMESPACE, "sh", str(cdi_root),
            "podman", "run", "--rm", f"--cgroup-parent=/{self.cgroup_parent}",
            *(f"--device={name}" for name in devices),
            "--rootfs", str(self.rootfs), "/bin/sh", "-c", script, "sh", *args,
        ]  # fmt: skip
        done = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        if done.returncode != 0:
            raise AssertionError(
                f"podman run --device {' --device '.join(devices)} failed ({done.returncode}):"
                f" {done.stderr.strip()}"
            )
        return done.stdout

    def close(self) -> None:
        """Remove the cgroups podman made under our parent, deepest first."""
        cgroups = Path("/sys/fs/cgroup")
        # cgroup v2 has one hierarchy, v1 and hybrid layouts one per controller.
        for hierarchy in [
            *cgroups.glob(self.cgroup_parent),
            *cgroups.glob(f"*/{self.cgroup_parent}"),
        ]:
            for folder, _, _ in sorted(os.walk(hierarchy), key=lambda w: -len(w[0])):
                Path(folder).rmdir()
