"""The daemon as a separate `unidra kubelet-plugin` process, for kill -9 and SIGTERM tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from driver.checkpoint import CheckpointStore, PreparedClaim
from driver.kubelet import client as kubelet
from driver.locks import FileLocks

REPO = Path(__file__).resolve().parents[2]


class Process:
    """`unidra` on the node: `argv` replaces the node's `kubelet-plugin` arguments, `args` are added to
    (and override) them."""

    def __init__(  # type: ignore[no-untyped-def]
        self,
        node,
        crashpoint: str = "",
        args: Sequence[str] = (),
        log: str = "daemon.log",
        argv: Sequence[str] = (),
    ) -> None:
        env = {**os.environ, "UNIDRA_CRASHPOINT": crashpoint, "PYTHONUNBUFFERED": "1"}
        self.log_path = node.root / log
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "driver", *(argv or node.argv()), *args],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=self.log,
        )

    def wait_registered(self, node) -> kubelet.Plugin:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 30
        while not kubelet.find_registration_sockets(node.registrar_dir):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode}: {self.output(node)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(self.output(node))
            time.sleep(0.01)
        return kubelet.wait_for_registration(node.registrar_dir)

    def text(self) -> str:
        """What this process logged."""
        return self.log_path.read_text(errors="replace")

    @staticmethod
    def output(node) -> str:  # type: ignore[no-untyped-def]
        return (node.root / "daemon.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes started by a test, killed at its end whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def checkpoint_claims(node) -> dict[str, PreparedClaim]:  # type: ignore[no-untyped-def]
    locks = FileLocks(node.plugin_dir / "serialize.lock")
    return CheckpointStore(node.plugin_dir / "checkpoint.json", locks).read().claims
