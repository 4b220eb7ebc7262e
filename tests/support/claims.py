"""Build ResourceClaim objects as the scheduler leaves them: allocated, reserved for a pod."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from driver.demo.apiserver import ApiServer as FakeApiServer

DRIVER = "unidra.dev"
CONFIG_API = "resource.unidra.dev/v1alpha1"


def result(
    device: str, pool: str, request: str = "gpu", driver: str = DRIVER, **extra: Any
) -> dict[str, Any]:
    return {"request": request, "driver": driver, "pool": pool, "device": device, **extra}


def env_config(
    env: dict[str, str],
    requests: Sequence[str] = (),
    source: str = "FromClaim",
    driver: str = DRIVER,
) -> dict[str, Any]:
    return device_config({"env": env}, requests, source, driver)


def sharing_config(
    strategy: str, requests: Sequence[str] = (), source: str = "FromClaim", **more: Any
) -> dict[str, Any]:
    """A config entry choosing a sharing strategy (with `interval=...`, `limits={...}`)."""
    return device_config({"sharing": {"strategy": strategy, **more}}, requests, source)


def device_config(
    fields: dict[str, Any],
    requests: Sequence[str] = (),
    source: str = "FromClaim",
    driver: str = DRIVER,
) -> dict[str, Any]:
    return {
        "source": source,
        "requests": list(requests),
        "opaque": {
            "driver": driver,
            "parameters": {"apiVersion": CONFIG_API, "kind": "DeviceConfig", **fields},
        },
    }


def share(device: str, pool: str, memory: str, compute: str = "0", **extra: Any) -> dict[str, Any]:
    """An allocation result as the 1.36 scheduler writes it for a share of a shareable device."""
    return result(
        device,
        pool,
        shareID=str(uuid.uuid4()),
        consumedCapacity={"memory": memory, "computeUnits": compute},
        **extra,
    )


def allocated_claim(
    api: FakeApiServer,
    name: str,
    results: Sequence[dict[str, Any]],
    namespace: str = "default",
    config: Sequence[dict[str, Any]] = (),
    allocated: bool = True,
) -> tuple[str, str, str]:
    """Create an allocated claim in the API server; returns kubelet's (namespace, name, uid) triple."""
    claim = {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "unidra.dev"}}]}
        },
        "status": {},
    }
    created = api.create("resource.k8s.io", "resourceclaims", claim)
    if allocated:
        created["status"] = {
            "allocation": {"devices": {"results": list(results), "config": list(config)}},
            "reservedFor": [{"resource": "pods", "name": f"{name}-pod", "uid": str(uuid.uuid4())}],
        }
        created = api.update("resource.k8s.io", "resourceclaims", created, subresource="status")
    return namespace, name, created["metadata"]["uid"]
