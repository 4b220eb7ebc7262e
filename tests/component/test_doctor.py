"""`unidra doctor` on fake nodes: directories, container-runtime CDI settings, vendor stacks, a
running daemon and the API server, each with the exact problem and its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driver import cli
from driver.demo.apiserver import ApiServer as FakeApiServer
from support.hosts import FakeHost


def doctor(capsys: pytest.CaptureFixture[str], root: Path, *extra: str) -> tuple[int, dict]:
    code = cli.main(
        [
            "doctor",
            f"--host-root={root / 'host'}",
            f"--kubelet-registrar-directory-path={root / 'plugins_registry'}",
            f"--kubelet-plugins-directory-path={root / 'plugins'}",
            f"--cdi-root={root / 'cdi'}",
            "--node-name=node-a",
            "-o",
            "json",
            *extra,
        ]
    )
    findings = {f["check"]: (f["status"], f["detail"]) for f in json.loads(capsys.readouterr().out)}
    return code, findings


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for directory in ("plugins_registry", "plugins", "host/etc"):
        (tmp_path / directory).mkdir(parents=True)
    return tmp_path


def test_a_prepared_node_has_no_problems(root: Path, capsys, node, running) -> None:  # type: ignore[no-untyped-def]
    code, findings = doctor(
        capsys,
        node.root,
        "--simulate=dgx-h100",
        f"--kubeconfig={node.kubeconfig}",
    )
    assert code == 0, findings
    assert findings["kubelet registration directory"][0] == "ok"
    assert findings["backend simulated"] == ("ok", "8 devices")
    assert findings["daemon"] == ("ok", f"1 instance(s) answering in {node.plugin_dir}")
    assert (
        findings["API server"][0] == "ok"
        and "resource.k8s.io/v1 served" in findings["API server"][1]
    )


def test_missing_kubelet_directories_are_problems(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, findings = doctor(capsys, tmp_path, "--simulate=rngd")
    assert code == 1
    status, detail = findings["kubelet plugins directory"]
    assert status == "FAIL" and f"{tmp_path / 'plugins'} does not exist" in detail
    assert findings["CDI directory"][0] == "ok"  # created on start


@pytest.mark.parametrize(
    ("config", "status", "says"),
    [
        ("version = 3\n", "ok", "enabled"),
        (
            'version = 3\n[plugins."io.containerd.cri.v1.runtime"]\nenable_cdi = false\n',
            "FAIL",
            'set enable_cdi = true under [plugins."io.containerd.cri.v1.runtime"]',
        ),
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\nenable_cdi = true\n',
            "ok",
            "enabled",
        ),
        ("version = 2\n", "warn", "off in 1.7"),
        (
            'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\nenable_cdi = true\n'
            'cdi_spec_dirs = ["/etc/cdi"]\n',
            "FAIL",
            "does not include",
        ),
        ("version = [\n", "warn", "cannot read"),
    ],
)
def test_containerd_cdi_settings(root: Path, capsys, config: str, status: str, says: str) -> None:  # type: ignore[no-untyped-def]
    FakeHost(root / "host").file("/etc/containerd/config.toml", config)
    _, findings = doctor(capsys, root, "--simulate=rngd", "--cdi-root=/var/run/cdi")
    assert findings["containerd CDI"][0] == status
    assert says in findings["containerd CDI"][1]


def test_crio_cdi_dirs(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    host = FakeHost(root / "host")
    host.file("/etc/crio/crio.conf", "[crio.runtime]\n")
    _, findings = doctor(capsys, root, "--simulate=rngd", "--cdi-root=/var/run/cdi")
    assert findings["CRI-O CDI"][0] == "ok"
    host.file("/etc/crio/crio.conf.d/10-cdi.conf", '[crio.runtime]\ncdi_spec_dirs = ["/etc/cdi"]\n')
    _, findings = doctor(capsys, root, "--simulate=rngd", "--cdi-root=/var/run/cdi")
    assert findings["CRI-O CDI"][0] == "FAIL"


def test_no_runtime_config_cannot_be_judged(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    _, findings = doctor(capsys, root, "--simulate=rngd")
    status, detail = findings["container runtime CDI"]
    assert status == "skip" and "mount the host's /etc/containerd" in detail


def test_hardware_without_its_driver_is_a_one_line_problem(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    FakeHost(root / "host").pci("0000:05:00.0", 0x1002, 0x74A1, 0x120000)
    code, findings = doctor(capsys, root)
    assert code == 1
    status, detail = findings["backend amd"]
    assert status == "FAIL" and "the amdgpu kernel driver is not loaded" in detail
    assert "\n" not in detail
    assert findings["backend nvidia"][0] == "skip"


def test_an_api_server_without_resource_v1_is_a_problem(root: Path, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with FakeApiServer(served_versions=("v1beta1",)) as old:
        kubeconfig = old.write_kubeconfig(tmp_path / "kubeconfig")
        code, findings = doctor(capsys, root, "--simulate=rngd", f"--kubeconfig={kubeconfig}")
    assert code == 1
    assert "needs Kubernetes 1.34 or newer" in findings["API server"][1]
