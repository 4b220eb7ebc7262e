"""The published vocabulary: one set of attribute and capacity names, filled the same way for every vendor.

Pure functions from the device model to ResourceSlice device entries. Every attribute has one
type for all vendors, so a CEL selector never meets a string where it expects a version.
docs/attributes.md documents each name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from driver import quantities, sharing
from driver.model import AttributeValue, Device, Partition, SharingSupport

STANDARD = "resource.kubernetes.io"
# Published as booleans on every device (true or false), so `attributes[...].fp8` never errors.
PRECISIONS = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "fp4", "int8", "int4")

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(-(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(\.(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*)?"
    r"(\+[0-9a-zA-Z-]+(\.[0-9a-zA-Z-]+)*)?$"
)
_NUMERIC = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?$")


def semver(value: str | None) -> str | None:
    """A semver 2.0.0 form of a version string, or None when it is not version-like.

    `9.0` becomes `9.0.0` and `v570.86` becomes `570.86.0`; VBIOS strings such as
    `96.00.99.00.01` are not versions and stay strings.
    """
    if not value:
        return None
    text = value.strip()
    if _SEMVER.match(text) and len(text) <= 64:
        return text
    numeric = _NUMERIC.match(text)
    if numeric:
        return ".".join(str(int(part or 0)) for part in numeric.groups())
    return None


def _string(value: str) -> dict[str, Any]:
    return {"string": value}


def _value(value: AttributeValue) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    return {"string": value}


def common_attributes(device: Device) -> dict[str, dict[str, Any]]:
    """Attributes a device and its partitions share."""
    attributes: dict[str, dict[str, Any]] = {
        "vendor": _string(device.vendor),
        "type": _string(device.type.value),
        "model": _string(device.model[:64]),
        "architecture": _string(device.architecture),
    }
    driver_version = semver(device.driver_version)
    if driver_version:
        attributes["driverVersion"] = {"version": driver_version}
    firmware_version = semver(device.firmware_version)
    if firmware_version:
        attributes["firmwareVersion"] = {"version": firmware_version}
    if device.firmware_version:
        attributes["firmware"] = _string(device.firmware_version[:64])
    capability = semver(device.compute_capability)
    if capability:
        attributes["computeCapability"] = {"version": capability}
    if device.compute_target:
        attributes["computeTarget"] = _string(device.compute_target)
    for precision in PRECISIONS:
        attributes[precision] = {"bool": precision in device.precisions}
    if device.pci_bus_id:
        attributes[f"{STANDARD}/pciBusID"] = _string(device.pci_bus_id)
    if device.pcie_root:
        attributes[f"{STANDARD}/pcieRoot"] = _string(device.pcie_root)
    if device.numa_node is not None and device.numa_node >= 0:
        attributes[f"{STANDARD}/numaNode"] = {"int": device.numa_node}
    for name, value in sorted(device.extra.items()):
        attributes[name] = _value(value)
    return attributes


def describe_device(device: Device, shared: SharingSupport | None = None) -> dict[str, Any]:
    """A whole device as a ResourceSlice device entry; with `shared`, as a shareable one
    (docs/sharing.md): several allocations at once, each consuming part of its capacities."""
    attributes = common_attributes(device)
    if device.uuid:
        attributes["uuid"] = _string(device.uuid)
    if device.index is not None:
        attributes["index"] = {"int": device.index}
    if device.interconnect is not None:
        attributes["interconnect"] = _string(device.interconnect.technology)
        attributes["interconnectDomain"] = _string(device.interconnect.domain[:64])
    attributes["partition"] = {"bool": device.partition_profile is not None}
    if device.partition_profile is not None:
        attributes["partitionProfile"] = _string(device.partition_profile)
    if device.parent_uuid:
        attributes["parentUUID"] = _string(device.parent_uuid)
    if shared is None:
        return _entry(device.name, attributes, _capacity(device.memory_bytes, device.compute_units))
    attributes.update(sharing.attributes(shared))
    entry = _entry(device.name, attributes, sharing.capacity(device, shared))
    entry["allowMultipleAllocations"] = True
    return entry


def describe_partition(partition: Partition) -> dict[str, Any]:
    """A partition: its parent's common attributes plus what makes it a partition.

    Partitions carry no uuid (it exists only once created) and no interconnect attributes
    (MIG instances cannot use NVLink peer-to-peer).
    """
    attributes = common_attributes(partition.parent)
    attributes["partition"] = {"bool": True}
    attributes["partitionProfile"] = _string(partition.profile)
    if partition.parent.uuid:
        attributes["parentUUID"] = _string(partition.parent.uuid)
    return _entry(
        partition.name, attributes, _capacity(partition.memory_bytes, partition.compute_units)
    )


def _entry(
    name: str, attributes: dict[str, dict[str, Any]], capacity: dict[str, Any]
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "attributes": dict(sorted(attributes.items()))}
    if capacity:  # the API server drops an empty map, so a re-read would look like a change
        entry["capacity"] = capacity
    return entry


def _capacity(memory: int | None, compute_units: int | None) -> dict[str, Any]:
    """Capacities the device reported; an unknown one is left out, never published as 0."""
    capacity: dict[str, Any] = {}
    if compute_units:
        capacity["computeUnits"] = {"value": quantities.canonical(compute_units)}
    if memory:
        capacity["memory"] = {"value": quantities.canonical(memory)}
    return capacity


def counters(values: Mapping[str, int]) -> dict[str, dict[str, str]]:
    return {name: {"value": quantities.canonical(value)} for name, value in sorted(values.items())}
