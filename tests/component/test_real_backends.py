"""Backends picked by the PCI devices of a (fake) host, and the daemon serving a real backend end to end."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

from driver import backends, cdi, daemon
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.kubelet import client as kubelet
from support import commands, container, nvml
from support.claims import allocated_claim, result
from support.hosts import FakeHost
from support.waiting import wait_until

RBLN = Path(__file__).resolve().parents[1] / "fixtures" / "rebellions" / "rbln-smi-atom.json"


def test_backends_are_picked_by_pci_vendor_and_class(tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "host")
    host.pci("0000:1b:00.0", 0x10DE, 0x2330, 0x030200, driver="nvidia")
    host.pci("0000:05:00.0", 0x1002, 0x74A1, 0x120000, driver="amdgpu")
    host.pci("0000:00:03.0", 0x1AE0, 0x0042, 0x020000, driver="gvnic")  # Google's NIC is not a TPU
    host.pci("0000:00:02.0", 0x8086, 0x4680, 0x060000)  # an Intel host bridge is not a GPU
    picked, reasons = backends.detect(host.root)
    assert picked == ["amd", "nvidia"]
    assert reasons["tpu"].startswith("no PCI device of vendor 0x1ae0")
    assert reasons["intel-gpu"].startswith("no PCI device of vendor 0x8086 (class 0x0300/0x0380)")
    assert "simulated" not in reasons


def rebellions_host(root: Path) -> FakeHost:
    host = FakeHost(root)
    json_file = host.file("/var/lib/fixture/rbln.json", RBLN.read_text())
    host.executable("/usr/bin/rbln-smi", f"cat {shlex.quote(str(json_file))}\n")
    for bus in ("3b", "3c", "5e", "5f"):
        host.pci(f"0000:{bus}:00.0", 0x1EFF, 0x1220, 0x120000, numa=0, driver="rebellions")
    host.proc_devices({"rbln": 507})
    return host


def test_daemon_serves_a_backend_it_picked_by_pci(node, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    host = rebellions_host(node.root / "host")
    instance = daemon.start(node.settings(backends=(), backend_options={}, host_root=host.root))
    try:
        plugin = kubelet.wait_for_registration(node.registrar_dir)
        devices = wait_until(
            lambda: [
                d["name"]
                for s in api.list("resource.k8s.io", "resourceslices")
                for d in s["spec"]["devices"]
            ],
            what="the NPUs to be published",
        )
        assert devices == [
            "npu-0000-3b-00-0",
            "npu-0000-3c-00-0",
            "npu-0000-5e-00-0",
            "npu-0000-5f-00-0",
        ]
        claim = allocated_claim(api, "npu", [result("npu-0000-5e-00-0", "node-a", "npu")])
        assert plugin.prepare([claim])[claim[2]].error == ""
        spec = json.loads((node.cdi_root / cdi.spec_filename("unidra.dev", claim[2])).read_text())
        assert spec["devices"][0]["containerEdits"]["deviceNodes"] == [
            {"path": "/dev/rbln2", "type": "c", "major": 507, "minor": 2}
        ]
        # Only simulated devices can be made to fail; real hardware refuses injected faults.
        refused = commands.run_simulate(
            node.plugins_dir, "inject", "--device=npu-0000-5e-00-0", "--fault=lost"
        )
        assert refused.returncode == 1
        assert "belongs to the rebellions backend, which takes no injected faults" in refused.stderr
        assert not instance.board.taints()
        plugin.close()
    finally:
        instance.stop()


def test_daemon_serves_the_real_h200_recording(node, api: FakeApiServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The H200 a real host answered for: published with 132 compute units, prepared with a CDI
    spec a CUDA container can load the driver from, and unprepared."""
    host = nvml.h200_host(FakeHost(node.root / "host"))
    with nvml.install(nvml.load_h200()):
        instance = daemon.start(node.settings(backends=(), backend_options={}, host_root=host.root))
        try:
            plugin = kubelet.wait_for_registration(node.registrar_dir)
            [device] = wait_until(
                lambda: [
                    d
                    for s in api.list("resource.k8s.io", "resourceslices")
                    for d in s["spec"]["devices"]
                ],
                what="the H200 to be published",
            )
            assert device["name"] == "gpu-0000-00-06-0"
            assert device["attributes"]["model"] == {"string": "NVIDIA H200"}
            assert device["capacity"] == {
                "computeUnits": {"value": "132"},
                "memory": {"value": "150754820096"},
            }
            claim = allocated_claim(api, "h200", [result("gpu-0000-00-06-0", "node-a", "gpu")])
            assert plugin.prepare([claim])[claim[2]].error == ""
            path = node.cdi_root / cdi.spec_filename("unidra.dev", claim[2])
            seen = container.resolve(json.loads(path.read_text()), host.root, tmp_path / "rootfs")
            assert seen.find_library("libcuda.so.1") == "/usr/local/nvidia/lib64/libcuda.so.1"
            assert seen.find_program("nvidia-smi") == "/usr/bin/nvidia-smi"
            assert seen.path("/dev/nvidia0").is_file() and seen.path("/dev/nvidia-uvm").is_file()
            assert plugin.unprepare([claim])[claim[2]].error == ""
            assert not path.exists()
            plugin.close()
        finally:
            instance.stop()


def test_partitions_on_a_backend_that_cannot_prepare_them_is_one_warning(
    node, api: FakeApiServer, caplog
) -> None:  # type: ignore[no-untyped-def]
    host = rebellions_host(node.root / "host")
    caplog.set_level(logging.WARNING, logger="driver.daemon")
    instance = daemon.start(
        node.settings(
            backends=("rebellions",), backend_options={}, host_root=host.root, partitions=True
        )
    )
    instance.stop()
    warnings = [r.getMessage() for r in caplog.records if "--partitions" in r.getMessage()]
    assert warnings == [
        "--partitions: the rebellions backend cannot create partitions at prepare, so publish "
        "none; partitions that already exist (MIG devices, AMD compute partitions) are "
        "published as devices"
    ]
