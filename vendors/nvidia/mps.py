"""NVIDIA MPS: one control daemon per shared GPU, run and watched by the driver itself.

Each GPU gets `<state-dir>/mps/<device>/` with `pipe` (the control and server sockets), `log`
(control.log, server.log) and `shm`. MPS clients and their server talk through files in
`/dev/shm`, so the daemon runs in a mount namespace of its own in which `shm` is bound on
`/dev/shm`, and every share's container gets the same directory as its `/dev/shm`. The daemon
runs in the foreground (`nvidia-cuda-mps-control -f`) as a child of the driver, with
`CUDA_VISIBLE_DEVICES` set to the GPU's UUID, so its clients see that GPU as device 0.

A daemon started by an earlier instance of the driver is found again by asking the control
pipe (`get_server_list`), so a restart never starts a second daemon on the same pipe. It is
stopped with `quit` on the control pipe, then signals, and its directory is removed.

Run as `python -m vendors.nvidia.mps SHM BINARY ARGS...`, this module is the launcher: it
enters the new mount namespace, binds SHM on /dev/shm, and executes BINARY.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from driver.errors import BackendUnavailable
from driver.model import ContainerEdits, Device, Mount, Sharing

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
# Where a share's container finds the daemon; /tmp/nvidia-mps is also MPS's own default.
CONTAINER_PIPE = "/tmp/nvidia-mps"  # noqa: S108 - a path inside the workload's container
CONTAINER_LOG = "/var/log/nvidia-mps"
CONTAINER_SHM = "/dev/shm"  # noqa: S108 - the path MPS itself uses, in the daemon's namespace
LAUNCH_LOG = "unidra-launch.log"
READY_FILE = "control"  # the control socket clients connect to
_RW = ("rw", "nosuid", "nodev", "bind")
_RO = ("ro", "nosuid", "nodev", "bind")
_CLONE_NEWNS = 0x00020000
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


@dataclass(frozen=True)
class MpsPaths:
    """The directories of one GPU's daemon, as host paths."""

    root: Path

    @property
    def pipe(self) -> Path:
        return self.root / "pipe"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def shm(self) -> Path:
        return self.root / "shm"


def client_env(sharing: Sharing, total_units: int) -> tuple[str, ...]:
    """A share's MPS environment: where the daemon is, and its limits from what it consumed."""
    env = [f"CUDA_MPS_PIPE_DIRECTORY={CONTAINER_PIPE}", f"CUDA_MPS_LOG_DIRECTORY={CONTAINER_LOG}"]
    if sharing.memory_bytes:
        # The client sees its GPU as device 0: the daemon's CUDA_VISIBLE_DEVICES names only it.
        env.append(f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0={memory_limit(sharing.memory_bytes)}")
    if sharing.compute_units and total_units:
        percent = min(100, max(1, math.ceil(sharing.compute_units * 100 / total_units)))
        env.append(f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={percent}")
    return tuple(env)


def memory_limit(value: int) -> str:
    """`30G` (GiB, the form verified on an H200) or `1536M` (MiB, rounded up)."""
    gib, mib = 1 << 30, 1 << 20
    return f"{value // gib}G" if value % gib == 0 else f"{math.ceil(value / mib)}M"


class MpsDaemons:
    """The control daemons of this node's GPUs: started on demand, watched, stopped."""

    def __init__(self, state_dir: Path, control: Path, start_timeout: float = 10.0) -> None:
        self.root = state_dir / "mps"
        self.control = control
        self.start_timeout = start_timeout
        # Daemons this instance started, by device: process IDs of children (sessions of their
        # own), not Popen objects, because they are meant to outlive the instance.
        self._children: dict[str, int] = {}
        self._lock = threading.Lock()

    def paths(self, device: Device) -> MpsPaths:
        return MpsPaths(self.root / device.name)

    def edits(self, device: Device, sharing: Sharing) -> ContainerEdits:
        paths = self.paths(device)
        return ContainerEdits(
            env=client_env(sharing, device.compute_units or 0),
            mounts=(
                Mount(str(paths.pipe), CONTAINER_PIPE, options=_RW),
                Mount(str(paths.log), CONTAINER_LOG, options=_RO),
                Mount(str(paths.shm), CONTAINER_SHM, options=_RW),
            ),
        )

    def known(self) -> list[str]:
        """Devices that have a daemon directory, running or left behind."""
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def ensure(self, device: Device) -> None:
        """Make sure the GPU's daemon runs: ours, one an earlier instance started, or a new one."""
        with self._lock:
            child = self._children.get(device.name)
            if child is not None and _running(child):
                return
            if child is not None:
                del self._children[device.name]
                log.error(
                    "MPS control daemon exited; starting it again", extra={"device": device.name}
                )
            elif self._answers(device):
                return
            self._start(device)

    def stop(self, device: Device) -> None:
        """Stop the GPU's daemon (its servers end with it) and remove its directory."""
        with self._lock:
            paths = self.paths(device)
            child = self._children.pop(device.name, None)
            running = child is not None and _running(child)
            # Bounded well inside the checkpoint lock's 30 s, which concurrent prepares wait for.
            if running or (child is None and self._answers(device)):
                self._ask(device, "quit\n", timeout=5.0)
            if child is not None:
                _end(child, grace=4.0)
            else:
                deadline = time.monotonic() + 5.0
                while self._answers(device) and time.monotonic() < deadline:
                    time.sleep(0.1)
            shutil.rmtree(paths.root, ignore_errors=True)
            log.info("Stopped MPS control daemon", extra={"device": device.name})

    def _start(self, device: Device) -> None:
        if not self.control.is_file():
            raise BackendUnavailable(
                f"{CONTROL} not found at {self.control}: install the NVIDIA driver's MPS tools"
            )
        paths = self.paths(device)
        # Clients in containers may run as any user, and must reach the sockets.
        for directory in (paths.pipe, paths.log, paths.shm):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o777 if directory != paths.log else 0o755)
        (paths.pipe / READY_FILE).unlink(missing_ok=True)
        env = {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": str(paths.pipe),
            "CUDA_MPS_LOG_DIRECTORY": str(paths.log),
            "CUDA_VISIBLE_DEVICES": device.uuid,
            # The control daemon starts nvidia-cuda-mps-server, installed next to it.
            "PATH": f"{self.control.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        argv = [sys.executable, "-m", __name__, str(paths.shm), str(self.control), "-f"]
        output = str(paths.log / LAUNCH_LOG)
        child = os.posix_spawn(
            sys.executable,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,  # signals to the driver's process group spare it
        )
        deadline = time.monotonic() + self.start_timeout
        while not (paths.pipe / READY_FILE).exists():
            if not _running(child):
                raise BackendUnavailable(
                    f"the MPS control daemon of {device.name} exited: {_last_line(paths)}"
                )
            if time.monotonic() > deadline:
                _end(child, grace=1.0)
                raise BackendUnavailable(
                    f"the MPS control daemon of {device.name} did not open its control pipe "
                    f"within {self.start_timeout:g}s: {_last_line(paths)}"
                )
            time.sleep(0.02)
        self._children[device.name] = child
        log.info(
            "Started MPS control daemon",
            extra={"device": device.name, "pid": child, "pipe": str(paths.pipe)},
        )

    def _answers(self, device: Device) -> bool:
        """Whether a daemon serves the GPU's pipe, whichever process started it."""
        if not (self.paths(device).pipe / READY_FILE).exists() or not self.control.is_file():
            return False
        return self._ask(device, "get_server_list\n", timeout=5.0)

    def _ask(self, device: Device, commands: str, timeout: float) -> bool:
        """Send commands to the daemon through the control client; whether it answered."""
        env: Mapping[str, str] = {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.paths(device).pipe),
            "CUDA_MPS_LOG_DIRECTORY": str(self.paths(device).log),
        }
        try:
            done = subprocess.run(  # the control client, no shell
                [str(self.control)],
                input=commands.encode(),
                env=env,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0


def _running(pid: int) -> bool:
    """Whether a child is still running; collects it if it has exited."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0


def _end(pid: int, grace: float) -> None:
    """Wait for a child to exit, then signal its session: SIGTERM, and SIGKILL if need be."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.02)


def _last_line(paths: MpsPaths) -> str:
    for name in ("control.log", LAUNCH_LOG):
        try:
            lines = (paths.log / name).read_text(errors="replace").strip().splitlines()
        except OSError:
            continue
        if lines:
            return lines[-1]
    return "no log output"


def launch(argv: list[str]) -> int:
    """Give the daemon its own /dev/shm, then become it (runs in a fresh, single-threaded process)."""
    if len(argv) < 2:
        print("usage: python -m vendors.nvidia.mps SHM BINARY [ARGS...]", file=sys.stderr)
        return 2
    shm, binary = argv[0], argv[1]
    libc = ctypes.CDLL(None, use_errno=True)
    unshare: Callable[[int], int] = libc.unshare
    mount: Callable[[bytes, bytes, bytes | None, int, bytes | None], int] = libc.mount
    steps: tuple[tuple[str, Callable[[], int]], ...] = (
        ("enter a mount namespace of its own", lambda: unshare(_CLONE_NEWNS)),
        (
            "make its mounts private",
            lambda: mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None),
        ),
        (
            f"bind {shm} on /dev/shm",
            lambda: mount(shm.encode(), CONTAINER_SHM.encode(), None, _MS_BIND, None),
        ),
    )
    for what, call in steps:
        if call() != 0:
            reason = os.strerror(ctypes.get_errno())
            print(
                f"unidra: the MPS control daemon cannot {what}: {reason} "
                "(the driver needs a privileged container for MPS; see docs/sharing.md)",
                file=sys.stderr,
            )
            return 1
    os.umask(0)  # clients in containers may run as any user, and must reach the sockets
    os.execv(binary, [binary, *argv[2:]])  # noqa: S606 - the MPS control binary, no shell


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
