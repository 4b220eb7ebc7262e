"""DESCRIBE: turn the inventory into the ResourceSlices of this node's pool; pure functions.

One pool per node, named after the node. Devices are split over as many slices as the API's
limits need (128 devices, 64 when a slice has taints or counter consumption). With partitions
(KEP-4815, Kubernetes 1.35+ layout) the counter sets live in slices of their own and devices
consume them from other slices of the same pool.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from driver import attributes
from driver.inventory import Inventory

API_VERSION = "resource.k8s.io/v1"
MAX_DEVICES = 128
MAX_DEVICES_WITH_TAINTS_OR_COUNTERS = 64
MAX_COUNTER_SETS = 8

Taints = Mapping[str, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class SliceContent:
    """What one slice carries: either devices or shared counters, never both."""

    devices: tuple[dict[str, Any], ...] = ()
    shared_counters: tuple[dict[str, Any], ...] = ()

    @property
    def identity(self) -> frozenset[str]:
        """Names of what the slice holds; matches desired slices to existing ones."""
        return frozenset(item["name"] for item in (*self.devices, *self.shared_counters))

    def spec_fields(self) -> dict[str, Any]:
        if self.shared_counters:
            return {"sharedCounters": copy.deepcopy(list(self.shared_counters))}
        return {"devices": copy.deepcopy(list(self.devices))}


def counter_set_name(device_name: str) -> str:
    return f"{device_name}-counters"


def describe(
    inventory: Inventory, taints: Taints | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Device entries (whole devices, then each one's partitions) and counter sets, in a stable order."""
    taints = taints or {}
    devices: list[dict[str, Any]] = []
    counter_sets: list[dict[str, Any]] = []
    for device in inventory.devices:
        shared = inventory.sharing.get(device.name) if device.name in inventory.shareable else None
        entry = attributes.describe_device(device, shared)
        layout = inventory.layouts.get(device.name)
        if layout is not None:
            set_name = counter_set_name(device.name)
            counter_sets.append(
                {"name": set_name, "counters": attributes.counters(layout.counters)}
            )
            entry["consumesCounters"] = [
                {"counterSet": set_name, "counters": attributes.counters(layout.counters)}
            ]
        devices.append(_tainted(entry, taints))
        for partition in layout.partitions if layout is not None else ():
            item = attributes.describe_partition(partition)
            item["consumesCounters"] = [
                {
                    "counterSet": counter_set_name(device.name),
                    "counters": attributes.counters(partition.consumes),
                }
            ]
            # A partition is as healthy as the device it is carved from.
            devices.append(_tainted(item, taints, device.name))
    return devices, counter_sets


def layout(
    devices: Sequence[dict[str, Any]], counter_sets: Sequence[dict[str, Any]]
) -> list[SliceContent]:
    """Split devices and counter sets over slices; always at least one slice, so an empty pool is visible."""
    slices = [
        SliceContent(shared_counters=tuple(counter_sets[i : i + MAX_COUNTER_SETS]))
        for i in range(0, len(counter_sets), MAX_COUNTER_SETS)
    ]
    chunk: list[dict[str, Any]] = []
    for device in devices:
        limited = any(_needs_smaller_slices(d) for d in (*chunk, device))
        if len(chunk) >= (MAX_DEVICES_WITH_TAINTS_OR_COUNTERS if limited else MAX_DEVICES):
            slices.append(SliceContent(devices=tuple(chunk)))
            chunk = []
        chunk.append(device)
    if chunk or not slices:
        slices.append(SliceContent(devices=tuple(chunk)))
    return slices


def build(inventory: Inventory, taints: Taints | None = None) -> list[SliceContent]:
    """The desired slices of this node's pool."""
    devices, counter_sets = describe(inventory, taints)
    return layout(devices, counter_sets)


def slice_object(
    content: SliceContent,
    *,
    driver: str,
    node: str,
    node_uid: str | None,
    generation: int,
    count: int,
) -> dict[str, Any]:
    """The ResourceSlice object as it is written to the API server."""
    metadata: dict[str, Any] = {"generateName": f"{node}-{driver}-"}
    if node_uid:
        # Garbage collection removes the slices together with the Node.
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid, "controller": True}
        ]
    return {
        "apiVersion": API_VERSION,
        "kind": "ResourceSlice",
        "metadata": metadata,
        "spec": {
            "driver": driver,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": count},
            "nodeName": node,
            **content.spec_fields(),
        },
    }


def _needs_smaller_slices(device: Mapping[str, Any]) -> bool:
    return bool(device.get("taints") or device.get("consumesCounters"))


def _tainted(entry: dict[str, Any], taints: Taints, parent: str | None = None) -> dict[str, Any]:
    device_taints = taints.get(entry["name"]) or (taints.get(parent) if parent else None)
    if device_taints:
        entry["taints"] = [dict(t) for t in device_taints]
    return entry


def without_partitions(contents: Sequence[SliceContent]) -> list[SliceContent]:
    """The same pool with partitions and counters removed, for servers that cannot store counters.

    Publishing partitions without their shared counters would let the scheduler hand out a GPU
    and its MIG instances at the same time, so they go entirely.
    """
    devices = []
    for content in contents:
        for device in content.devices:
            if device.get("attributes", {}).get("partition", {}).get("bool"):
                continue
            entry = copy.deepcopy(device)
            entry.pop("consumesCounters", None)
            devices.append(entry)
    return layout(devices, [])
