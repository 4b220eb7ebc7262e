"""The end-to-end suite's fixtures: one real Kubernetes cluster per session, Unidra installed in it,
and the kubelet plugin as a process registered with the real kubelet.

The binaries come from the directory in UNIDRA_E2E_BIN (`.ci/run` unpacks ../shared/lab there).
Without it every test here is skipped with one reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.plugin import PluginProcess, install_overlay

from driver.localcluster import LocalCluster, missing_binaries

BIN_ENV = "UNIDRA_E2E_BIN"


def _unavailable() -> str | None:
    directory = os.environ.get(BIN_ENV)
    if not directory:
        return (
            f"{BIN_ENV} is not set: point it at a directory with kube-apiserver, "
            "kube-controller-manager, kube-scheduler, kubelet, kubectl, labetcd and fakecri "
            "(see tests/e2e/README.md)"
        )
    missing = missing_binaries(Path(directory))
    if missing:
        return f"{BIN_ENV}={directory} lacks {', '.join(missing)}"
    if shutil.which("openssl") is None:
        return "openssl is not installed; the local cluster needs it for its certificates"
    return None


@pytest.fixture(scope="session")
def kube_bin() -> Path:
    """The directory of the Kubernetes binaries; the tests that use it skip (or fail) without it."""
    reason = _unavailable()
    if reason and os.environ.get("UNIDRA_E2E_REQUIRED"):
        pytest.fail(f"the e2e suite is required here, but {reason}")
    if reason:
        pytest.skip(reason)
    return Path(os.environ[BIN_ENV])


@pytest.fixture(scope="session")
def cluster(kube_bin: Path) -> Iterator[LocalCluster]:
    """A running cluster with one Ready node (`node-a`) on the fake CRI."""
    # Short: Unix socket paths under it must stay within 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="ue2e-", dir="/tmp"))
    local = LocalCluster(kube_bin, workdir)
    try:
        local.start()
        yield local
    finally:
        local.stop()
        if os.environ.get("UNIDRA_E2E_KEEP"):
            print(f"e2e cluster files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def installed(cluster: LocalCluster) -> str:
    """Unidra's simulated overlay applied with `kubectl apply -k`; returns kubectl's stderr."""
    return install_overlay(cluster, "simulated")


@pytest.fixture(scope="module")
def plugin(cluster: LocalCluster, installed: str) -> Iterator[PluginProcess]:
    """`unidra kubelet-plugin --simulate dgx-h100`, registered with the real kubelet."""
    with PluginProcess(cluster, simulate="dgx-h100") as process:
        yield process
