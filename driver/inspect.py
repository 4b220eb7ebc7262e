"""Render an inventory for people (a table) or programs (JSON); pure functions."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from driver import slices, validation
from driver.inventory import Inventory
from driver.model import Device, Partition

_COLUMNS = (
    "NAME",
    "VENDOR",
    "TYPE",
    "MODEL",
    "ARCH",
    "MEMORY",
    "UNITS",
    "PCI",
    "NUMA",
    "INTERCONNECT",
)


def human_bytes(value: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if value >= size:
            return f"{value / size:.1f} {unit}".replace(".0 ", " ")
    return f"{value} B"


def _known(value: int | None, shown: str) -> str:
    return "-" if not value else shown


def _device_row(d: Device) -> tuple[str, ...]:
    return (
        d.name,
        d.vendor,
        d.type.value,
        d.model,
        d.architecture,
        _known(d.memory_bytes, human_bytes(d.memory_bytes or 0)),
        _known(d.compute_units, str(d.compute_units)),
        d.pci_bus_id or "-",
        "-" if d.numa_node is None else str(d.numa_node),
        f"{d.interconnect.technology}:{d.interconnect.domain}" if d.interconnect else "-",
    )


def _partition_row(p: Partition) -> tuple[str, ...]:
    parent = p.parent
    return (
        p.name,
        parent.vendor,
        parent.type.value,
        f"{parent.model} {p.profile} (partition)",
        parent.architecture,
        human_bytes(p.memory_bytes),
        str(p.compute_units),
        parent.pci_bus_id or "-",
        "-" if parent.numa_node is None else str(parent.numa_node),
        "-",
    )


def table(devices: Sequence[Device], partitions: Sequence[Partition] = ()) -> str:
    """One row per device, each followed by the partitions carved from it (with --partitions)."""
    by_parent: dict[str, list[Partition]] = {}
    for partition in partitions:
        by_parent.setdefault(partition.parent.name, []).append(partition)
    rows = [
        row
        for d in devices
        for row in [_device_row(d), *(_partition_row(p) for p in by_parent.get(d.name, ()))]
    ]
    widths = [max(len(row[i]) for row in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [_COLUMNS, *rows]
    ]
    return "\n".join(lines)


def device_json(device: Device) -> dict[str, Any]:
    return {
        "name": device.name,
        "backend": device.backend,
        "vendor": device.vendor,
        "type": device.type.value,
        "model": device.model,
        "architecture": device.architecture,
        "uuid": device.uuid,
        "index": device.index,
        "memoryBytes": device.memory_bytes,
        "computeUnits": device.compute_units,
        "pciBusID": device.pci_bus_id,
        "pcieRoot": device.pcie_root,
        "numaNode": device.numa_node,
        "driverVersion": device.driver_version,
        "firmwareVersion": device.firmware_version,
        "computeCapability": device.compute_capability,
        "computeTarget": device.compute_target,
        "precisions": sorted(device.precisions),
        "interconnect": (
            {"technology": device.interconnect.technology, "domain": device.interconnect.domain}
            if device.interconnect
            else None
        ),
        "peers": list(device.peers),
        "extra": dict(device.extra),
        "partitionProfile": device.partition_profile,
        "parentUUID": device.parent_uuid,
        # Offered by the hardware, not published: no backend creates partitions at prepare yet.
        "offeredProfiles": [
            {
                "name": o.name,
                "instances": o.instances,
                "computeUnits": o.compute_units,
                "memoryBytes": o.memory_bytes,
            }
            for o in device.offered_profiles
        ],
    }


def partition_json(partition: Partition) -> dict[str, Any]:
    return {
        "name": partition.name,
        "parent": partition.parent.name,
        "profile": partition.profile,
        "placement": partition.placement,
        "memoryBytes": partition.memory_bytes,
        "computeUnits": partition.compute_units,
        "consumes": dict(partition.consumes),
    }


def devices_document(
    devices: Sequence[Device],
    failures: Mapping[str, str],
    output: str,
    partitions: Sequence[Partition] = (),
) -> str:
    document = {
        "devices": [device_json(d) for d in devices],
        "partitions": [partition_json(p) for p in partitions],
        "unavailableBackends": dict(failures),
    }
    if output == "yaml":
        return yaml.safe_dump(document, sort_keys=False).rstrip()
    return json.dumps(document, indent=2)


def slices_document(found: Inventory, *, driver: str, node: str, output: str) -> str:
    """The ResourceSlices the daemon would publish for this inventory, validated, as YAML or JSON.

    Generation and owner reference are those of a first publish; the daemon adds the Node's UID
    as owner, which only the API server knows.
    """
    contents = slices.build(found)
    objects = [
        slices.slice_object(
            c, driver=driver, node=node, node_uid=None, generation=1, count=len(contents)
        )
        for c in contents
    ]
    validation.check_pool(objects)
    if output == "json":
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2)
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False).rstrip()
