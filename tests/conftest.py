"""Shared fixtures: a fake API server, short temp dirs for sockets, and an in-process daemon with a fake kubelet."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from driver import daemon
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.kubelet import client as kubelet
from driver.settings import Settings

NODE = "node-a"
pytest_plugins = ["support.processes"]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="u", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.create("", "nodes", {"metadata": {"name": NODE}})
        yield server


@dataclass
class Node:
    """Paths of one simulated node, shared by the daemon and the fake kubelet."""

    root: Path
    kubeconfig: Path

    @property
    def registrar_dir(self) -> Path:
        return self.root / "plugins_registry"

    @property
    def plugins_dir(self) -> Path:
        return self.root / "plugins"

    @property
    def plugin_dir(self) -> Path:
        return self.plugins_dir / "unidra.dev"

    @property
    def cdi_root(self) -> Path:
        return self.root / "cdi"

    def settings(self, profile: str = "dgx-h100", **overrides: object) -> Settings:
        values: dict[str, object] = {
            "node_name": NODE,
            "kubeconfig": self.kubeconfig,
            "cdi_root": self.cdi_root,
            "registrar_dir": self.registrar_dir,
            "plugins_dir": self.plugins_dir,
            "backends": ("simulated",),
            "backend_options": {"simulated": {"profile": profile}},
            "shutdown_grace_seconds": 5.0,
            # Ephemeral ports: tests may run daemons side by side.
            "metrics_address": "127.0.0.1:0",
            "healthcheck_port": 0,
        }
        values.update(overrides)
        return Settings(**values).validate()  # type: ignore[arg-type]

    @contextlib.contextmanager
    def serve(
        self, profile: str = "dgx-h100", **overrides: object
    ) -> Iterator[tuple[daemon.Daemon, kubelet.Plugin]]:
        """A started daemon and the fake kubelet's registered connection to it; both closed after."""
        instance = daemon.start(self.settings(profile, **overrides))
        plugin = kubelet.wait_for_registration(self.registrar_dir, expected_driver="unidra.dev")
        try:
            yield instance, plugin
        finally:
            plugin.close()
            instance.stop()

    def argv(self, profile: str = "dgx-h100") -> list[str]:
        """The same node as `unidra kubelet-plugin` arguments."""
        return [
            "kubelet-plugin",
            f"--node-name={NODE}",
            f"--kubeconfig={self.kubeconfig}",
            f"--cdi-root={self.cdi_root}",
            f"--kubelet-registrar-directory-path={self.registrar_dir}",
            f"--kubelet-plugins-directory-path={self.plugins_dir}",
            f"--simulate={profile}",
            "--metrics-address=127.0.0.1:0",
            "--healthcheck-port=0",
        ]


@pytest.fixture
def node(short_tmp: Path, api: FakeApiServer) -> Node:
    return Node(root=short_tmp, kubeconfig=api.write_kubeconfig(short_tmp / "kubeconfig"))


@pytest.fixture
def running(node: Node) -> Iterator[tuple[daemon.Daemon, kubelet.Plugin]]:
    """A started daemon (dgx-h100) and the fake kubelet's registered connection to it."""
    with node.serve() as serving:
        yield serving


class _Crashes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(
            f"{record.getMessage()} ({record.__dict__.get('loop')}): {record.exc_text or ''}"
        )


@pytest.fixture(autouse=True)
def no_background_crashes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test during which a supervised background loop crashed or returned unexpectedly.

    Tests that crash a loop on purpose carry the `crashes_expected` marker.
    """
    handler = _Crashes()
    supervisor_log = logging.getLogger("driver.supervisor")
    supervisor_log.addHandler(handler)
    yield
    supervisor_log.removeHandler(handler)
    if request.node.get_closest_marker("crashes_expected") is None:
        assert handler.messages == [], "background loops crashed"
