"""The checked-in protobuf code matches proto/, and the descriptors are wire-compatible with kubelet's."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the [test] extra")
    subprocess.run(
        [sys.executable, str(REPO / "hack/gen-proto"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "driver/kubelet/gen"
    committed = REPO / "driver/kubelet/gen"
    fresh_files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    committed_files = sorted(
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh_files == committed_files, "run hack/gen-proto: the set of generated files changed"
    stale = [
        str(p) for p in fresh_files if not filecmp.cmp(fresh / p, committed / p, shallow=False)
    ]
    assert stale == [], f"generated code is stale, run hack/gen-proto: {stale}"


def test_wire_names_match_kubelet() -> None:
    from driver.kubelet.gen.dra.v1 import api_pb2 as v1
    from driver.kubelet.gen.dra.v1beta1 import api_pb2 as v1beta1
    from driver.kubelet.gen.dra_health.v1 import api_pb2 as health_v1
    from driver.kubelet.gen.dra_health.v1alpha1 import api_pb2 as health_v1alpha1
    from driver.kubelet.gen.pluginregistration.v1 import api_pb2 as reg

    assert (
        v1.DESCRIPTOR.services_by_name["DRAPlugin"].full_name
        == "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin"
    )
    assert (
        v1beta1.DESCRIPTOR.services_by_name["DRAPlugin"].full_name
        == "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin"
    )
    assert (
        health_v1alpha1.DESCRIPTOR.services_by_name["DRAResourceHealth"].full_name
        == "v1alpha1.DRAResourceHealth"
    )
    assert (
        health_v1.DESCRIPTOR.services_by_name["DRAResourceHealth"].full_name
        == "v1.DRAResourceHealth"
    )
    assert (
        reg.DESCRIPTOR.services_by_name["Registration"].full_name
        == "pluginregistration.Registration"
    )
    share = v1.Device.DESCRIPTOR.fields_by_name["share_id"]
    assert share.number == 5 and share.has_presence
    assert "share_id" not in v1beta1.Device.DESCRIPTOR.fields_by_name
    numbers = {f.name: f.number for f in v1.Device.DESCRIPTOR.fields}
    assert numbers == {
        "request_names": 1,
        "pool_name": 2,
        "device_name": 3,
        "cdi_device_ids": 4,
        "share_id": 5,
    }
    assert {f.name: f.number for f in v1.Claim.DESCRIPTOR.fields} == {
        "namespace": 1,
        "uid": 2,
        "name": 3,
    }
    health = {f.name: f.number for f in health_v1alpha1.DeviceHealth.DESCRIPTOR.fields}
    assert health == {
        "device": 1,
        "health": 2,
        "last_updated_time": 3,
        "health_check_timeout_seconds": 4,
        "message": 5,
    }


def test_descriptor_pool_holds_distinct_file_names() -> None:
    from driver.kubelet.gen.dra.v1 import api_pb2 as v1
    from driver.kubelet.gen.dra.v1beta1 import api_pb2 as v1beta1

    assert v1.DESCRIPTOR.name == "driver/kubelet/gen/dra/v1/api.proto"
    assert v1beta1.DESCRIPTOR.name == "driver/kubelet/gen/dra/v1beta1/api.proto"


def test_v1_message_decodes_as_v1beta1_on_the_wire() -> None:
    from driver.kubelet.gen.dra.v1 import api_pb2 as v1
    from driver.kubelet.gen.dra.v1beta1 import api_pb2 as v1beta1

    message = v1.Device(
        request_names=["gpu"],
        pool_name="p",
        device_name="d",
        cdi_device_ids=["k/c=x"],
        share_id="s",
    )
    decoded = v1beta1.Device.FromString(message.SerializeToString())
    assert (decoded.pool_name, decoded.device_name, list(decoded.cdi_device_ids)) == (
        "p",
        "d",
        ["k/c=x"],
    )
