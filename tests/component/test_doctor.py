"""`unidra doctor` on fake nodes: directories, container-runtime CDI settings, vendor stacks, a
running daemon and the API server, each with the exact problem and its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver import cli, kubeapi
from driver.demo.apiserver import ApiServer as FakeApiServer
from support import nvml
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
def root(short_tmp: Path) -> Path:
    for directory in ("plugins_registry", "plugins", "host/etc"):
        (short_tmp / directory).mkdir(parents=True)
    return short_tmp


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
    status, detail = findings["kubelet registration directory"]
    assert status == "FAIL" and f"{tmp_path / 'plugins_registry'} does not exist" in detail
    # The daemon creates its own directory and the CDI directory where it may.
    assert findings["plugin directory"][0] == "ok"
    assert findings["CDI directory"][0] == "ok"


@pytest.mark.skipif(
    subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0,
    reason="needs a mount namespace (unshare -m) for a read-only bind mount",
)
def test_only_the_mounted_plugin_directory_must_be_writable(short_tmp: Path) -> None:
    """The DaemonSet's layout: the parent plugins directory read-only, the driver's own writable."""
    root = short_tmp
    (root / "plugins_registry").mkdir()
    (root / "plugins" / "unidra.dev").mkdir(parents=True)
    (root / "rw").mkdir()
    (root / "host" / "sys").mkdir(parents=True)
    (root / "host" / "dev").mkdir()
    plugins = root / "plugins"
    script = (
        f"mount --bind {plugins} {plugins} && mount -o remount,bind,ro {plugins} && "
        f"mount --bind {root / 'rw'} {plugins / 'unidra.dev'} && "
        f"{sys.executable} -m driver doctor --simulate=rngd -o json --node-name=node-a "
        f"--host-root={root / 'host'} --kubelet-plugins-directory-path={plugins} "
        f"--kubelet-registrar-directory-path={root / 'plugins_registry'} --cdi-root={root / 'cdi'}"
    )
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""},
    )
    findings = {f["check"]: (f["status"], f["detail"]) for f in json.loads(run.stdout)}
    assert findings["plugin directory"] == ("ok", f"{plugins / 'unidra.dev'} is writable")
    assert run.returncode == 0, findings


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
    assert status == "skip" and "not checked" in detail
    assert "the DaemonSet does not mount the host's /etc: run `unidra doctor` on the node" in detail


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


def test_doctor_says_where_the_nvidia_driver_is(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """On the H200 host's layout (/usr/local/nvidia, its loader cache), without NVML loaded."""
    host = nvml.h200_host(FakeHost(root / "host"))
    host.file(
        "/proc/driver/nvidia/version",
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build\n",
    )
    _, findings = doctor(capsys, root)
    assert findings["NVIDIA driver files"] == (
        "ok",
        "driver 580.159.04, root /usr/local/nvidia, libraries in /usr/local/nvidia/lib64 "
        "(libcuda.so.1 from the usual folders)",
    )


def test_doctor_warns_when_a_cuda_container_would_lack_a_library(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    host = nvml.h200_host(FakeHost(root / "host"))
    for path in (host.root / "usr/local/nvidia/lib64").glob("libnvidia-nvvm.so*"):
        path.unlink()
    _, findings = doctor(capsys, root, "--vendors=nvidia")
    status, detail = findings["NVIDIA driver files"]
    assert status == "warn"
    assert detail.startswith("driver 580.159.04, root /usr/local/nvidia")  # from libcuda's name
    assert detail.endswith("; a CUDA container would lack libnvidia-nvvm.so.4")


def test_doctor_without_nvidia_driver_files(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    FakeHost(root / "host").pci("0000:1b:00.0", 0x10DE, 0x2330, 0x030200, driver="nvidia")
    code, findings = doctor(capsys, root, "--backend-option=nvidia.driver-root=/run/nvidia/driver")
    status, detail = findings["NVIDIA driver files"]
    assert code == 1 and status == "FAIL"
    assert "no NVIDIA driver libraries under" in detail and "nvidia.driver-root=" in detail
    assert (
        cli.main(
            [
                "doctor",
                f"--host-root={root / 'host'}",
                "--backend-option=nvidia.driver-root=run/nvidia",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == (
        "unidra: invalid setting: --backend-option: nvidia.driver-root=run/nvidia: "
        "expected an absolute host path such as /run/nvidia/driver\n"
    )


@pytest.fixture
def cluster(root: Path, tmp_path: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    with FakeApiServer() as server:
        server.create("", "nodes", {"metadata": {"name": "node-a"}})
        yield server, server.write_kubeconfig(tmp_path / "kubeconfig")


def test_an_unknown_node_is_a_problem(root: Path, capsys, cluster) -> None:  # type: ignore[no-untyped-def]
    _, kubeconfig = cluster
    code, findings = doctor(
        capsys, root, "--simulate=rngd", f"--kubeconfig={kubeconfig}", "--node-name=does-not-exist"
    )
    assert code == 1
    status, detail = findings["node"]
    assert status == "FAIL" and "no Node named 'does-not-exist'" in detail


def test_missing_permissions_are_named(root: Path, capsys, cluster) -> None:  # type: ignore[no-untyped-def]
    server, kubeconfig = cluster
    code, findings = doctor(capsys, root, "--simulate=rngd", f"--kubeconfig={kubeconfig}")
    assert findings["permissions"] == (
        "ok",
        "all 9 API calls of the driver allowed, including associated-node:update on "
        "resourceclaims/driver named unidra.dev",
    )
    server.denied = {("resource.k8s.io", "resourceclaims/status", "update"), ("", "nodes", "get")}
    code, findings = doctor(capsys, root, "--simulate=rngd", f"--kubeconfig={kubeconfig}")
    assert code == 1
    status, detail = findings["permissions"]
    assert status == "FAIL"
    assert "may not update resourceclaims/status.resource.k8s.io, get nodes" in detail
    reviews = [r for r in server.requests if r.path.endswith("/selfsubjectaccessreviews")]
    assert len(reviews) == 2 * len(kubeapi.PERMISSIONS)


def _drop(*fields: str):  # type: ignore[no-untyped-def]
    """An API server whose feature gates are off for these slice fields."""

    def hook(plural: str, obj: dict) -> None:
        if plural != "resourceslices":
            return
        obj["spec"].pop("sharedCounters", None) if "sharedCounters" in fields else None
        for device in obj["spec"].get("devices") or []:
            for field in fields:
                device.pop(field, None)

    return hook


def test_feature_gates_are_found_by_a_dry_run_write(root: Path, capsys, cluster) -> None:  # type: ignore[no-untyped-def]
    server, kubeconfig = cluster
    _, findings = doctor(
        capsys, root, "--simulate=rngd", f"--kubeconfig={kubeconfig}", "--partitions"
    )
    assert findings["device taints"] == ("ok", "DRADeviceTaints is on")
    assert findings["partitions"] == ("ok", "DRAPartitionableDevices is on")
    assert findings["consumable capacity"] == ("ok", "DRAConsumableCapacity is on")
    assert server.list("resource.k8s.io", "resourceslices") == []  # a dry run stores nothing

    server.storage_hooks.append(_drop("taints", "consumesCounters", "sharedCounters"))
    code, findings = doctor(capsys, root, "--simulate=rngd", f"--kubeconfig={kubeconfig}")
    assert code == 0  # nothing asked for needs partitions; taints are a warning
    assert findings["device taints"][0] == "warn"
    assert "DRADeviceTaints is off" in findings["device taints"][1]
    assert findings["partitions"][0] == "skip"
    code, findings = doctor(
        capsys, root, "--simulate=rngd", f"--kubeconfig={kubeconfig}", "--partitions"
    )
    assert code == 1
    status, detail = findings["partitions"]
    assert status == "FAIL" and "--partitions cannot publish" in detail
