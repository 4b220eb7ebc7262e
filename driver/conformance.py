"""Checks every backend must pass, for Unidra's own backends and out-of-tree ones alike.

`check(backend)` discovers devices, publishes them as ResourceSlices (validated against the
API server's rules), and builds the CDI spec a claim on every device would get (validated
against the CDI rules Unidra relies on). `check_optional_reads` makes each optional read fail
in turn and checks that no device is lost. Both raise AssertionError naming what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

from driver import cdi, inventory, slices, validation
from driver.backends import Backend, Partitioner
from driver.model import ContainerEdits, Device

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check(backend: Backend, partitions: bool = True) -> inventory.Inventory:
    """Run the conformance checks; returns the inventory for further, backend-specific assertions."""
    found = inventory.discover([backend], partitions=partitions)
    _check_inventory(backend, found)
    for device in found.devices:
        _check_edits(backend.device_edits(device), device.name)
    _check_spec(backend, found.devices)
    if isinstance(backend, Partitioner):
        for partition in found.partitions.values():
            _check_edits(backend.partition_edits(partition), partition.name)
    return found


# A read failing for one run, installed around backend construction and discovery.
Fault = tuple[str, Callable[[], AbstractContextManager[object]]]


def check_optional_reads(
    build: Callable[[], Backend], faults: Iterable[Fault], partitions: bool = True
) -> int:
    """Only identity is required: with each optional read failing in turn (`faults`, one at a
    time), the backend still discovers every device under the same name, and the slices of
    its pool still pass the API server's validation. Returns how many faults were run."""
    baseline = sorted(check(build(), partitions).by_name)
    count = 0
    for label, fault in faults:
        with fault():
            backend = build()
            found = inventory.discover([backend], partitions=partitions)
            assert sorted(found.by_name) == baseline, (
                f"with {label}: discovered {sorted(found.by_name)}, not {baseline} "
                f"(failures: {dict(found.failures)})"
            )
            _check_inventory(backend, found)
        count += 1
    assert count, "no faults to run"
    return count


def _check_inventory(backend: Backend, found: inventory.Inventory) -> None:
    assert not found.failures, f"discovery failed: {found.failures}"
    devices = found.devices
    assert devices, "the backend found no devices"
    for device in devices:
        assert _DNS_LABEL.match(device.name) and len(device.name) <= 63, (
            f"bad device name {device.name!r}"
        )
        assert device.backend == backend.name, (
            f"{device.name}: backend is {device.backend!r}, not {backend.name!r}"
        )
        assert device.memory_bytes is None or device.memory_bytes > 0, (
            f"{device.name}: memory {device.memory_bytes}; None when unknown"
        )
        assert device.compute_units is None or device.compute_units > 0, (
            f"{device.name}: {device.compute_units} compute units; None when unknown"
        )
        assert device.numa_node is None or device.numa_node >= 0, (
            f"{device.name}: NUMA node {device.numa_node}"
        )
    contents = slices.build(found)
    objects = [
        slices.slice_object(
            c, driver="unidra.dev", node="node", node_uid=None, generation=1, count=len(contents)
        )
        for c in contents
    ]
    validation.check_pool(objects)


def _check_edits(edits: ContainerEdits, name: str) -> None:
    assert edits, f"{name}: a device needs container edits (at least its device nodes)"
    for node in edits.device_nodes:
        assert node.path.startswith("/dev/"), f"{name}: device node {node.path} is not under /dev"
        assert node.major is not None and node.minor is not None, (
            f"{name}: {node.path} has no device number"
        )
        assert node.type in ("c", "b"), f"{name}: {node.path} has type {node.type!r}"
    for item in edits.env:
        assert "=" in item[1:], f"{name}: env entry {item!r} is not NAME=value"


def _check_spec(backend: Backend, devices: Sequence[Device]) -> None:
    uid = "00000000-0000-4000-8000-000000000000"
    entries = [
        cdi.CdiDevice(cdi.device_name(uid, d.name), backend.device_edits(d)) for d in devices
    ]
    spec = cdi.build_claim_spec("unidra.dev", entries, backend.shared_edits(devices))
    assert spec["cdiVersion"] in ("0.3.0", "0.4.0", "0.5.0", "0.6.0"), spec["cdiVersion"]
