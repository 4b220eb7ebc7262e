"""A cluster's DRA objects as the driver, the scheduler and an admin leave them: ResourceSlices of
simulated nodes (the driver's real slice builder), allocated claims, pods and DeviceTaintRules.

For the fleet tests, the operations runbook's examples and hack/bench-fleet.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from driver import inventory, slices
from driver.backends import BackendContext
from driver.slices import SliceContent
from vendors.simulated import SimulatedBackend

DRIVER = "unidra.dev"


@functools.cache
def _contents(profile: str, partitions: bool) -> tuple[SliceContent, ...]:
    backend = SimulatedBackend(BackendContext(node_name="template", options={"profile": profile}))
    return tuple(slices.build(inventory.discover([backend], partitions=partitions)))


def node_slices(
    node: str,
    profile: str = "dgx-h100",
    *,
    partitions: bool = False,
    domains: int = 1,
    driver: str = DRIVER,
    generation: int = 1,
    taints: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
) -> list[dict[str, Any]]:
    """The slices a node with `profile` publishes; its fabric is split into `domains` domains of
    consecutive devices, each named after the node (real domain ids are per node or per rack)."""
    contents = _contents(profile, partitions)
    objects = []
    for index, content in enumerate(contents):
        obj = slices.slice_object(
            content,
            driver=driver,
            node=node,
            node_uid=None,
            generation=generation,
            count=len(contents),
        )
        obj["metadata"] = {"name": f"{node}-{driver}-{index}"}
        objects.append(obj)
    fabric = [
        d
        for o in objects
        for d in o["spec"].get("devices") or []
        if "interconnectDomain" in d["attributes"]
    ]
    for position, device in enumerate(fabric):
        part = position * domains // len(fabric)
        name = device["attributes"]["interconnectDomain"]["string"]
        domain = f"{node}-{name}" if domains == 1 else f"{node}-{name}-{part}"
        device["attributes"]["interconnectDomain"] = {"string": domain}
    for obj in objects:
        for device in obj["spec"].get("devices") or []:
            if taints and device["name"] in taints:
                device["taints"] = [dict(t) for t in taints[device["name"]]]
    return objects


def device_names(profile: str = "dgx-h100", partitions: bool = False) -> list[str]:
    return [d["name"] for c in _contents(profile, partitions) for d in c.devices]


def claim(
    name: str,
    devices: Iterable[tuple[str, str]] = (),
    *,
    namespace: str = "default",
    pods: Sequence[str] = (),
    device_class: str = "gpu.unidra.dev",
    count: int | None = None,
    driver: str = DRIVER,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A claim for `count` devices of a class; allocated to `devices` ((pool, device) pairs) if any."""
    allocated = list(devices)
    obj: dict[str, Any] = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace, **_annotations(annotations)},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpus",
                        "exactly": {
                            "deviceClassName": device_class,
                            "count": count or max(1, len(allocated)),
                        },
                    }
                ]
            }
        },
    }
    if allocated:
        obj["status"] = {
            "allocation": {
                "devices": {
                    "results": [
                        {"request": "gpus", "driver": driver, "pool": pool, "device": device}
                        for pool, device in allocated
                    ]
                }
            },
            "reservedFor": [
                {"resource": "pods", "name": pod, "uid": f"uid-{namespace}-{pod}"} for pod in pods
            ],
        }
    return obj


def _annotations(annotations: Mapping[str, str] | None) -> dict[str, Any]:
    return {"annotations": dict(annotations)} if annotations else {}


def pod(
    name: str,
    claims: Sequence[str],
    *,
    namespace: str = "default",
    node: str = "",
    phase: str = "Running",
) -> dict[str, Any]:
    """A pod using existing claims (`resourceClaimName`); Pending and unbound when `node` is empty."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            **({"nodeName": node} if node else {}),
            "containers": [{"name": "main", "image": "lab.local/pause:1"}],
            "resourceClaims": [{"name": c, "resourceClaimName": c} for c in claims],
        },
        "status": {"phase": phase},
    }


def node(name: str, *, unschedulable: bool = False, ready: str = "True") -> dict[str, Any]:
    """A Node as kubelet registers it: cordoned when `unschedulable`, with its Ready condition."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": ready, "reason": "KubeletReady"},
            ]
        },
    }


def taint_rule(
    name: str,
    *,
    key: str,
    value: str = "",
    effect: str = "NoSchedule",
    driver: str = DRIVER,
    pool: str = "",
    device: str = "",
) -> dict[str, Any]:
    selector = {k: v for k, v in (("driver", driver), ("pool", pool), ("device", device)) if v}
    return {
        "apiVersion": "resource.k8s.io/v1beta2",
        "kind": "DeviceTaintRule",
        "metadata": {"name": name},
        "spec": {
            "deviceSelector": selector,
            "taint": {"key": key, **({"value": value} if value else {}), "effect": effect},
        },
    }


def unhealthy(reason: str = "xid-79", effect: str = "NoSchedule") -> list[dict[str, str]]:
    """The taint the driver's health monitor puts on a failing device."""
    return [{"key": f"{DRIVER}/unhealthy", "value": reason, "effect": effect}]


def with_status(obj: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    updated = copy.deepcopy(dict(obj))
    updated["status"] = copy.deepcopy(dict(status))
    return updated
