"""CDI spec building: names, file naming, the minimum-version table, and validity per the CDI spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from driver import cdi
from driver.model import ContainerEdits, DeviceNode, Mount
from support.cdi_validator import required_version, validate

UID = "7d3c0f4e-1a2b-4c5d-9e8f-0a1b2c3d4e5f"


NO_EDITS = ContainerEdits()


def spec_with(edits: ContainerEdits, name: str = "d0", shared: ContainerEdits = NO_EDITS) -> dict:
    return cdi.build_claim_spec("unidra.dev", [cdi.CdiDevice(name, edits)], shared)


@pytest.mark.parametrize(
    ("edits", "name", "expected"),
    [
        (ContainerEdits(env=("A=1",)), "dev", "0.3.0"),
        (ContainerEdits(mounts=(Mount("/h", "/c", type="bind"),)), "dev", "0.4.0"),
        (ContainerEdits(env=("A=1",)), "7dev", "0.5.0"),
        (
            ContainerEdits(
                device_nodes=(DeviceNode("/dev/x", host_path="/fake/x", major=1, minor=1),)
            ),
            "dev",
            "0.5.0",
        ),
    ],
    ids=["plain", "mount-type", "digit-name", "host-path"],
)
def test_minimum_version(edits: ContainerEdits, name: str, expected: str) -> None:
    spec = spec_with(edits, name)
    assert spec["cdiVersion"] == expected
    assert required_version(spec) == expected  # agrees with the independent reading of the spec
    validate(spec)


def test_claim_spec_shape_and_names() -> None:
    node = DeviceNode("/dev/nvidia0", type="c", major=195, minor=0)
    shared = ContainerEdits(
        env=("NVIDIA_VISIBLE_DEVICES=void",),
        device_nodes=(DeviceNode("/dev/nvidiactl", major=195, minor=255),),
    )
    name = cdi.device_name(UID, "gpu-0000-1b-00-0")
    spec = spec_with(ContainerEdits(device_nodes=(node,)), name, shared)
    validate(spec)
    assert spec["kind"] == "k8s.unidra.dev/claim"
    assert spec["devices"][0] == {
        "name": f"{UID}-gpu-0000-1b-00-0",
        "containerEdits": {
            "deviceNodes": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}]
        },
    }
    assert spec["containerEdits"]["env"] == ["NVIDIA_VISIBLE_DEVICES=void"]
    assert cdi.qualified_name("unidra.dev", name) == f"k8s.unidra.dev/claim={UID}-gpu-0000-1b-00-0"


def test_share_id_makes_the_device_name_unique() -> None:
    assert cdi.device_name(UID, "gpu-a", "s1") != cdi.device_name(UID, "gpu-a", "s2")


@pytest.mark.parametrize("uid", ["../x", "a/b", "", "x" * 64, "-lead", "has space"])
def test_unsafe_claim_uids_never_become_paths(uid: str) -> None:
    with pytest.raises(ValueError, match="not UUID-like"):
        cdi.spec_path(Path("/var/run/cdi"), "unidra.dev", uid)


def test_spec_files_round_trip_and_are_listed(tmp_path: Path) -> None:
    path = cdi.spec_path(tmp_path, "unidra.dev", UID)
    spec = spec_with(ContainerEdits(env=("A=1",)))
    cdi.write_spec(path, spec)
    (tmp_path / "k8s.other.dev-claim_x.json").write_text("{}")
    (tmp_path / "unrelated.yaml").write_text("x")
    assert cdi.read_spec(path) == spec
    assert cdi.claim_specs(tmp_path, "unidra.dev") == {UID: path}
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    path.write_text("{broken")
    assert cdi.read_spec(path) is None
