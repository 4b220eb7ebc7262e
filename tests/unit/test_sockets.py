"""Socket naming: kubelet's defaults, per-pod names for rolling upgrades, and the 108-byte limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from driver.errors import FatalError
from driver.kubelet import sockets

UID = "0d5b7e4c-9f1a-4b2c-8d3e-5f6a7b8c9d0e"


def test_default_names() -> None:
    assert sockets.registration_socket(
        Path("/var/lib/kubelet/plugins_registry"), "unidra.dev", None
    ) == Path("/var/lib/kubelet/plugins_registry/unidra.dev-reg.sock")
    assert sockets.dra_socket(Path("/var/lib/kubelet/plugins/unidra.dev"), None) == Path(
        "/var/lib/kubelet/plugins/unidra.dev/dra.sock"
    )


def test_pod_uid_names() -> None:
    assert sockets.registration_socket(Path("/r"), "unidra.dev", UID) == Path(
        f"/r/unidra.dev-{UID}-reg.sock"
    )
    assert sockets.dra_socket(Path("/p/unidra.dev"), UID) == Path(f"/p/unidra.dev/dra-{UID}.sock")
    assert sockets.control_socket(Path("/p/unidra.dev"), UID) == Path(
        f"/p/unidra.dev/control-{UID}.sock"
    )
    assert sockets.control_socket(Path("/p/unidra.dev"), None) == Path("/p/unidra.dev/control.sock")


def test_long_paths_fall_back_to_a_digest_of_the_pod_uid() -> None:
    long_driver = "accelerators.very-long-organisation-name.example.com"
    path = sockets.registration_socket(Path("/var/lib/kubelet/plugins_registry"), long_driver, UID)
    assert len(str(path)) <= sockets.MAX_SOCKET_PATH
    assert UID not in str(path) and path.name.endswith("-reg.sock")
    assert path == sockets.registration_socket(
        Path("/var/lib/kubelet/plugins_registry"), long_driver, UID
    )


def test_paths_that_cannot_fit_are_a_clear_error() -> None:
    with pytest.raises(FatalError, match="Unix sockets allow 107"):
        sockets.dra_socket(Path("/" + "d" * 120), None)
