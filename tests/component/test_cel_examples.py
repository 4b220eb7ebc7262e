"""The DeviceClasses in manifests/ and the example claims in docs/examples/ select what their comments say.

Selectors run with a CEL interpreter over the slices of the simulated profiles, and the
allocation search applies the claims' matchAttribute constraints as the scheduler would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from driver import inventory, sharing, slices
from driver.backends import BackendContext
from support import dra_cel
from vendors.simulated import SimulatedBackend

REPO = Path(__file__).resolve().parents[2]
DRIVER = "unidra.dev"
CLASSES = {
    c["metadata"]["name"]: c
    for c in yaml.safe_load_all((REPO / "manifests/base/deviceclasses.yaml").read_text())
}


def published(profile: str, partitions: bool = False, shared: bool = False) -> list[dict]:
    backend = SimulatedBackend(BackendContext(node_name="node-a", options={"profile": profile}))
    policy = sharing.parse_policy(shared, {})
    contents = slices.build(inventory.discover([backend], partitions=partitions, policy=policy))
    return [d for c in contents for d in c.devices]


def example(name: str) -> dict:
    document = yaml.safe_load((REPO / "docs/examples" / name).read_text())
    return document["spec"]["spec"]


def chosen(name: str, profile: str, partitions: bool = False, shared: bool = False) -> set[str]:
    """Every device that appears in at least one valid allocation of the example claim."""
    devices = published(profile, partitions, shared)
    found = dra_cel.allocations(example(name), CLASSES, devices, DRIVER)
    return {device for allocation in found for group in allocation.values() for device in group}


def models(names: set[str], profile: str, partitions: bool = False) -> set[str]:
    devices = {d["name"]: d for d in published(profile, partitions)}
    return {devices[n]["attributes"]["model"]["string"] for n in names}


def test_every_example_is_listed_here() -> None:
    assert sorted(p.name for p in (REPO / "docs/examples").glob("*.yaml")) == sorted(
        [
            "gpu-80gi-bf16.yaml",
            "two-on-one-fabric.yaml",
            "partition-20gi.yaml",
            "gpu-and-npu-same-numa.yaml",
            "any-fp8.yaml",
            "nvidia-driver-550.yaml",
            "gpu-share-30gi.yaml",
            "compute-share.yaml",
        ]
    )


@pytest.mark.parametrize(
    ("profile", "expected"),
    [("mixed", {"NVIDIA H100 NVL"}), ("mi300x", {"AMD Instinct MI300X"}), ("dgx-h100", set())],
)
def test_gpu_with_80gi_and_bf16(profile: str, expected: set[str]) -> None:
    assert models(chosen("gpu-80gi-bf16.yaml", profile), profile) == expected


def test_two_devices_on_one_fabric_stay_on_one_fabric() -> None:
    devices = {d["name"]: d for d in published("mixed")}
    found = list(
        dra_cel.allocations(
            example("two-on-one-fabric.yaml"), CLASSES, list(devices.values()), DRIVER
        )
    )
    domains = {devices[a["accel"][0]]["attributes"]["interconnectDomain"]["string"] for a in found}
    assert domains == {"nvlink-bridge-0", "xgmi-hive-0x1f00a3c25e9d0b47", "rsd-0"}
    assert all(
        devices[a["accel"][0]]["attributes"]["interconnectDomain"]
        == devices[a["accel"][1]]["attributes"]["interconnectDomain"]
        for a in found
    )
    assert (
        len(found) == 3
    )  # the pair of each fabric, nothing across fabrics or over PCIe-only cards
    assert (
        list(
            dra_cel.allocations(
                example("two-on-one-fabric.yaml"), CLASSES, published("rngd"), DRIVER
            )
        )
        == []
    )


def test_partition_of_at_least_20gi() -> None:
    names = chosen("partition-20gi.yaml", "dgx-h100", partitions=True)
    profiles = {n.split("-mig-")[1].rsplit("-", 1)[0] for n in names}
    assert profiles == {"3g40gb", "4g40gb", "7g80gb"}
    assert (
        len(chosen("partition-20gi.yaml", "mi300x", partitions=True)) == 64
    )  # 8 CPX partitions per GPU
    assert chosen("partition-20gi.yaml", "dgx-h100") == set()  # without --partitions there are none


def test_gpu_and_npu_on_the_same_numa_node() -> None:
    devices = {d["name"]: d for d in published("mixed")}
    found = list(
        dra_cel.allocations(
            example("gpu-and-npu-same-numa.yaml"), CLASSES, list(devices.values()), DRIVER
        )
    )
    assert {devices[a["gpu"][0]]["attributes"]["model"]["string"] for a in found} == {
        "Intel Data Center GPU Max 1100"
    }
    assert len(found) == 4  # the one GPU on NUMA node 1 with each of the four NPUs there


def test_any_accelerator_with_fp8() -> None:
    assert models(chosen("any-fp8.yaml", "mixed"), "mixed") == {"NVIDIA H100 NVL", "FuriosaAI RNGD"}
    assert models(chosen("any-fp8.yaml", "gaudi3"), "gaudi3") == {"Intel Gaudi 3 HL-325L"}


def test_nvidia_driver_at_least_550() -> None:
    assert len(chosen("nvidia-driver-550.yaml", "dgx-h100")) == 8
    assert chosen("nvidia-driver-550.yaml", "mi300x") == set()


def test_a_30gi_share_of_a_shareable_gpu() -> None:
    assert len(chosen("gpu-share-30gi.yaml", "dgx-h100", shared=True)) == 8
    assert chosen("gpu-share-30gi.yaml", "dgx-h100") == set()  # without --sharing: no shares
    # Gaudi HPUs are never shared; the mixed node's GPUs are.
    assert chosen("gpu-share-30gi.yaml", "gaudi3", shared=True) == set()
    assert len(chosen("gpu-share-30gi.yaml", "mixed", shared=True)) == 5


def test_a_compute_share_goes_only_where_compute_is_held() -> None:
    assert len(chosen("compute-share.yaml", "mi300x", shared=True)) == 8  # CU masks
    # A simulated NVIDIA GPU has no MPS: it time-slices, and offers no compute units.
    assert chosen("compute-share.yaml", "dgx-h100", shared=True) == set()


@pytest.mark.parametrize(
    ("device_class", "profile", "count"),
    [
        ("accelerator.unidra.dev", "mixed", 9),
        ("gpu.unidra.dev", "mixed", 5),
        ("npu.unidra.dev", "mixed", 4),
        ("hpu.unidra.dev", "gaudi3", 8),
        ("tpu.unidra.dev", "mixed", 0),
        ("nvidia.unidra.dev", "mixed", 2),
        ("amd.unidra.dev", "mixed", 2),
        ("intel.unidra.dev", "mixed", 1),
        ("furiosa.unidra.dev", "mixed", 2),
        ("rebellions.unidra.dev", "mixed", 2),
        ("google.unidra.dev", "mixed", 0),
        ("partition.unidra.dev", "mixed", 0),
    ],
)
def test_device_classes(device_class: str, profile: str, count: int) -> None:
    request = {"name": "r", "exactly": {"deviceClassName": device_class}}
    assert len(dra_cel.candidates(request, CLASSES, published(profile), DRIVER)) == count


def test_whole_device_classes_never_take_partitions() -> None:
    request = {"name": "r", "exactly": {"deviceClassName": "gpu.unidra.dev"}}
    assert (
        len(dra_cel.candidates(request, CLASSES, published("dgx-h100", partitions=True), DRIVER))
        == 8
    )
    request = {"name": "r", "exactly": {"deviceClassName": "partition.unidra.dev"}}
    assert (
        len(dra_cel.candidates(request, CLASSES, published("dgx-h100", partitions=True), DRIVER))
        == 200
    )
