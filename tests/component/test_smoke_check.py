"""hack/smoke-nvidia's pass/fail check, proven here on the real H200's replayed answers and a fake
host tree: it passes where a node works, and fails, naming why, where a CUDA container would
not find the driver."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from support import commands, nvml
from support.hosts import FakeHost


@pytest.fixture(scope="module")
def smoke() -> ModuleType:
    return commands.hack_script("smoke.py")


def node_host(root: Path) -> FakeHost:
    """The H200 host tree, with the device nodes any host with a working NVIDIA driver has."""
    host = nvml.h200_host(FakeHost(root))
    for path, major, minor in (
        ("/dev/nvidia0", 195, 0),
        ("/dev/nvidiactl", 195, 255),
        ("/dev/nvidia-uvm", 238, 0),
        ("/dev/nvidia-uvm-tools", 238, 1),
    ):
        host.char_node(path, major, minor)
    return host


def test_the_check_passes_on_the_h200_replay(smoke: ModuleType, short_tmp: Path) -> None:
    host = node_host(short_tmp / "host")
    with nvml.install(nvml.load_h200()):
        results = smoke.check_node("nvidia", host.root, timeout=20)
    report = smoke.summary("nvidia", results)
    assert [(r.check, r.passed) for r in results] == [
        ("published", True),
        ("prepared", True),
        ("health", True),
        ("metrics", True),
    ], report
    assert "gpu-0000-00-06-0 (132)" in results[0].detail
    assert "NVML events registered for 1 of 1 GPU(s): {'gpu-0000-00-06-0': '0xa'}" in report
    assert report.splitlines()[-1] == "smoke-nvidia: 4 of 4 checks passed: passed"


def test_the_check_fails_when_a_cuda_container_would_lack_libcuda(
    smoke: ModuleType, short_tmp: Path
) -> None:
    host = node_host(short_tmp / "host")
    for path in (host.root / "usr/local/nvidia/lib64").glob("libcuda.so*"):
        path.unlink()
    with nvml.install(nvml.load_h200()):
        results = smoke.check_node("nvidia", host.root, timeout=20)
    prepared = next(r for r in results if r.check == "prepared")
    assert not prepared.passed
    assert prepared.detail == "a CUDA container would not find libcuda.so.1"
    assert smoke.summary("nvidia", results).endswith("3 of 4 checks passed: FAILED")


def test_the_check_fails_when_the_plugin_cannot_start(smoke: ModuleType, short_tmp: Path) -> None:
    host = node_host(short_tmp / "host")
    with nvml.install(nvml.load_h200(), init_error="DriverNotLoaded"):
        results = smoke.check_node("nvidia", host.root, timeout=2)
    assert [(r.check, r.passed) for r in results] == [("start", False)]
    assert "no devices found by any backend" in results[0].detail


def test_a_gpu_nvml_lost_is_published_but_fails_the_check(
    smoke: ModuleType, short_tmp: Path
) -> None:
    host = node_host(short_tmp / "host")
    recording = nvml.load_h200()
    recording["devices"] = []  # NVML lists nothing; the kernel driver still holds the GPU
    with nvml.install(recording):
        results = smoke.check_node("nvidia", host.root, timeout=1)
    published, prepared = results[:2]
    assert (
        not published.passed
        and "1 device(s) in ResourceSlices, 0 with compute units" in published.detail
    )
    assert not prepared.passed and "gpu-0000-00-06-0 cannot be used" in prepared.detail
