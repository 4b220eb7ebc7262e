"""The attribute vocabulary: one type per name for every vendor, version normalisation, standard attributes."""

from __future__ import annotations

import pytest

from driver import attributes, inventory
from driver.backends import BackendContext
from vendors.simulated import SimulatedBackend, profiles


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("570.86.15", "570.86.15"),
        ("9.0", "9.0.0"),
        ("v1.20", "1.20.0"),
        ("2025.2.0+7b3a2e1", "2025.2.0+7b3a2e1"),
        ("1.3.73", "1.3.73"),
        ("6.8.0-45-generic", "6.8.0-45-generic"),
        ("96.00.99.00.01", None),
        ("113-M3000100-103", None),
        ("gfx942", None),
        ("", None),
        (None, None),
    ],
)
def test_semver_normalisation(raw: str | None, expected: str | None) -> None:
    assert attributes.semver(raw) == expected


def every_device() -> list[dict]:
    entries = []
    for name in profiles.builtin_names():
        backend = SimulatedBackend(BackendContext(node_name="n", options={"profile": name}))
        found = inventory.discover([backend], partitions=True)
        entries += [attributes.describe_device(d) for d in found.devices]
        entries += [attributes.describe_partition(p) for p in found.partitions.values()]
    return entries


def test_each_attribute_has_one_type_across_all_vendors() -> None:
    types: dict[str, set[str]] = {}
    for entry in every_device():
        for name, value in entry["attributes"].items():
            types.setdefault(name, set()).update(value)
    mixed = {name: kinds for name, kinds in types.items() if len(kinds) > 1}
    assert mixed == {}


def test_every_device_carries_the_common_vocabulary() -> None:
    required = {"vendor", "type", "model", "architecture", "partition", *attributes.PRECISIONS}
    for entry in every_device():
        assert required <= set(entry["attributes"]), entry["name"]
        assert set(entry["capacity"]) == {"memory", "computeUnits"}
        assert len(entry["attributes"]) + len(entry["capacity"]) <= 32


def test_standard_attributes_and_unknown_numa() -> None:
    backend = SimulatedBackend(BackendContext(node_name="n", options={"profile": "dgx-h100"}))
    device = backend.discover()[0]
    published = attributes.describe_device(device)["attributes"]
    assert published["resource.kubernetes.io/pciBusID"] == {"string": "0000:1b:00.0"}
    assert published["resource.kubernetes.io/pcieRoot"] == {"string": "pci0000:15"}
    assert published["resource.kubernetes.io/numaNode"] == {"int": 0}
    assert published["computeCapability"] == {"version": "9.0.0"}
    assert published["computeTarget"] == {"string": "sm_90"}
    assert published["firmware"] == {"string": "96.00.99.00.01"}
    assert "firmwareVersion" not in published  # a VBIOS string is not a version
    from dataclasses import replace

    unknown = attributes.describe_device(replace(device, numa_node=None, pcie_root=None))[
        "attributes"
    ]
    assert "resource.kubernetes.io/numaNode" not in unknown
    assert "resource.kubernetes.io/pcieRoot" not in unknown


def test_partitions_inherit_the_parent_and_name_it() -> None:
    backend = SimulatedBackend(BackendContext(node_name="n", options={"profile": "dgx-h100"}))
    found = inventory.discover([backend], partitions=True)
    partition = found.partitions["gpu-0000-1b-00-0-mig-1g10gb-3"]
    published = attributes.describe_partition(partition)
    assert published["attributes"]["partition"] == {"bool": True}
    assert published["attributes"]["partitionProfile"] == {"string": "1g.10gb"}
    assert published["attributes"]["parentUUID"] == {"string": partition.parent.uuid}
    assert (
        "uuid" not in published["attributes"]
        and "interconnectDomain" not in published["attributes"]
    )
    assert published["capacity"]["memory"] == {"value": str(9984 * 2**20)}
