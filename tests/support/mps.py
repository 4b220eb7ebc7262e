"""A fake NVIDIA host for sharing: `nvidia-smi` and `nvidia-cuda-mps-control` that record what
they were asked, and the control program behaving as MPS's does at its interface.

`nvidia-cuda-mps-control -f` serves a Unix socket `control` in $CUDA_MPS_PIPE_DIRECTORY until
it is told `quit`, and writes a file into /dev/shm (so a test sees which directory that was).
Without arguments it is the control client: it sends its stdin to the daemon's socket, or says
"Cannot find MPS control daemon process" and fails when none listens. Every run appends one
JSON line to the record: what it was, its MPS environment, and what it was told.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from support.hosts import FakeHost

MPS_ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY", "CUDA_VISIBLE_DEVICES")
SHM_MARKER = "cuda.shm.fake"

_CONTROL = """#!{python}
import json, os, socket, sys

RECORD = {record!r}
MARKER = {marker!r}
ENV = {env!r}


def note(**entry):
    entry["env"] = {{k: os.environ[k] for k in ENV if k in os.environ}}
    with open(RECORD, "a") as out:
        out.write(json.dumps(entry) + "\\n")


pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
path = os.path.join(pipe, "control")
if sys.argv[1:] == ["-f"]:
    with open(os.path.join("/dev/shm", MARKER), "w") as shm:
        shm.write(str(os.getpid()))
    log = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
    with open(os.path.join(log, "control.log"), "a") as out:
        out.write("[fake] control daemon started\\n")
    # Recorded before the socket appears: the driver returns as soon as it sees the socket.
    note(mode="daemon", argv=sys.argv[1:], pid=os.getpid())
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        commands = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break
            commands += chunk
        note(mode="command", commands=commands.decode().split())
        conn.sendall(b"" if b"quit" in commands else b"\\n")
        conn.close()
        if b"quit" in commands:
            server.close()
            os.unlink(path)
            sys.exit(0)
else:
    commands = sys.stdin.read()
    note(mode="client", argv=sys.argv[1:], commands=commands.split())
    client = socket.socket(socket.AF_UNIX)
    try:
        client.connect(path)
    except OSError:
        print("Cannot find MPS control daemon process", file=sys.stderr)
        sys.exit(1)
    client.sendall(commands.encode())
    client.shutdown(socket.SHUT_WR)
    sys.stdout.write(client.recv(4096).decode())
"""


def nvidia_tools(host: FakeHost, record: Path, mps: bool = True, bin_dir: str = "/usr/bin") -> None:
    """nvidia-smi, and with `mps` the MPS control program, under the host root."""
    host.executable(
        f"{bin_dir}/nvidia-smi", f'echo "nvidia-smi $*" >> {record.with_suffix(".smi")}\n'
    )
    if mps:
        script = _CONTROL.format(
            python=sys.executable, record=str(record), marker=SHM_MARKER, env=MPS_ENV
        )
        host.file(f"{bin_dir}/nvidia-cuda-mps-control", script, mode=0o755)


def smi_calls(record: Path) -> list[str]:
    path = record.with_suffix(".smi")
    return path.read_text().splitlines() if path.exists() else []


def runs(record: Path, mode: str | None = None) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    return [e for e in entries if mode is None or e["mode"] == mode]


def kill_daemons(record: Path) -> None:
    """End every fake daemon a test started, whatever the test did (daemons outlive drivers)."""
    for entry in runs(record, "daemon"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry["pid"], signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: it only waits for its parent to collect it.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
