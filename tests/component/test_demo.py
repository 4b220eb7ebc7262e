"""`unidra demo` as a new user runs it from the README: the whole story, no cluster, no GPU,
nothing outside its private directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from component.test_cli import one_line_error, unidra


@pytest.fixture(autouse=True)
def embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded API server, even where the environment names Kubernetes binaries (CI)."""
    monkeypatch.delenv("UNIDRA_KUBE_BIN", raising=False)


def test_the_demo_tells_the_whole_story_in_a_private_directory() -> None:
    cdi_before = sorted(Path("/var/run/cdi").glob("*")) if Path("/var/run/cdi").is_dir() else []
    run = unidra("demo", "--keep")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    out = run.stdout
    root = Path(re.search(r"live in (/tmp/unidra-demo-\w+)\.", out).group(1))  # type: ignore[union-attr]
    try:
        steps = [
            "A private place for everything.",
            "Node demo-node exists",
            "The Unidra kubelet plugin starts for demo-node, on simulated hardware (dgx-h100).",
            "Kubelet finds the registration socket and registers the plugin.",
            "The plugin publishes 8 devices as ResourceSlices (pool demo-node):",
            "gpu-0000-1b-00-0  NVIDIA H100 80GB HBM3  80 GiB memory",
            "It picked gpu-0000-1b-00-0.",
            "The plugin answers with the CDI device IDs for the container runtime: "
            "k8s.unidra.dev/claim=",
            '"kind": "k8s.unidra.dev/claim"',
            '"path": "/dev/nvidia0"',
            "gpu-0000-1b-00-0: lost 79: unhealthy",
            "taint: unidra.dev/unhealthy=lost-79:NoExecute",
            "gpu-0000-1b-00-0: UNHEALTHY Xid 79: GPU has fallen off the bus",
            "Ready=False (Xid 79: GPU has fallen off the bus)",
            'unidra_health_events_total{kind="lost"} 1',
            'hw_status{hw_id="gpu-0000-1b-00-0",hw_state="failed"} 1',
            "recovery reported; it stays unhealthy (and tainted)",
            "the taint is gone",
            "gpu-0000-1b-00-0: HEALTHY",
            "Its CDI spec is removed: [] left.",
            "Done.",
        ]
        position = 0
        for step in steps:  # in this order
            found = out.find(step, position)
            assert found >= 0, f"{step!r} missing after position {position}:\n{out}"
            position = found
        # Every path it printed is inside its private directory.
        for path in re.findall(r"(/(?:tmp|var|run|etc)/[^\s:,)]+)", out):
            if path != "/var/run/cdi.":
                assert path.startswith(str(root)), path
        assert (root / "plugin.log").read_text()
        assert not list(root.rglob("*.sock"))  # the plugin stopped and removed its sockets
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    after = sorted(Path("/var/run/cdi").glob("*")) if Path("/var/run/cdi").is_dir() else []
    assert after == cdi_before


def test_without_keep_nothing_is_left() -> None:
    run = unidra("demo", "--profile", "mixed")
    assert run.returncode == 0, run.stdout + run.stderr
    root = Path(re.search(r"live in (/tmp/unidra-demo-\w+)\.", run.stdout).group(1))  # type: ignore[union-attr]
    assert not root.exists()


def test_kube_bin_without_the_binaries_names_the_flag_and_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "kubectl").write_text("")
    one_line_error(unidra("demo", f"--kube-bin={tmp_path}"), 2, "--kube-bin", "lacks labetcd")
