"""Device health through the real cluster: taints keep claims away or evict pods, and faults show in pod status."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from e2e.plugin import (
    REPO,
    PluginProcess,
    apply,
    claim_template,
    delete,
    delete_pods,
    device_request,
    ensure_namespace,
    get,
    pod,
    pod_claims,
    pod_object,
    published_devices,
    scheduling_message,
    wait_pod_gone,
    wait_pod_ready,
    wait_published,
)

from driver.localcluster import LocalCluster
from support.waiting import wait_until

NS = "e2e-health"
DEVICE = "gpu-0000-1b-00-0"
PINNED = 'device.attributes["resource.kubernetes.io"].pciBusID == "0000:1b:00.0"'


@pytest.fixture(scope="module")
def healthy(cluster: LocalCluster, installed: str) -> Iterator[PluginProcess]:
    """A dgx-h100 node whose conditions clear as soon as the device recovers, and a claim template for one GPU."""
    ensure_namespace(cluster, NS)
    apply(
        cluster,
        claim_template(
            "pinned", NS, {"devices": {"requests": [device_request(selectors=[PINNED])]}}
        ),
    )
    with PluginProcess(
        cluster, simulate="dgx-h100", args=["--health-min-hold-seconds=0"]
    ) as process:
        wait_published(cluster, 8)
        yield process


@pytest.fixture(autouse=True)
def no_pods_left(cluster: LocalCluster) -> Iterator[None]:
    """Whatever a test leaves running would hold the GPU the next one needs."""
    yield
    delete_pods(cluster, NS)


def _simulate(process: PluginProcess, *args: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "driver",
            "simulate",
            *args,
            f"--kubelet-plugins-directory-path={process.cluster.plugins_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def _taints(cluster: LocalCluster) -> list[dict[str, Any]]:
    return list(published_devices(cluster).get(DEVICE, {}).get("taints", []))


@pytest.fixture
def fault(healthy: PluginProcess, cluster: LocalCluster) -> Iterator[Any]:
    """inject(fault) makes the device fail; the device is recovered, untainted, after the test."""

    def inject(name: str) -> list[dict[str, Any]]:
        _simulate(healthy, "inject", f"--device={DEVICE}", f"--fault={name}")
        return wait_until(lambda: _taints(cluster), timeout=15, what="the taint in the slice")

    yield inject
    _simulate(healthy, "recover", f"--device={DEVICE}")
    wait_until(lambda: not _taints(cluster), timeout=15, what="the taint to clear")


def test_a_noschedule_taint_keeps_new_claims_away_until_the_device_recovers(
    cluster: LocalCluster, healthy: PluginProcess, fault: Any
) -> None:
    (taint,) = fault("xid-119")
    assert (taint["key"], taint["effect"]) == ("unidra.dev/unhealthy", "NoSchedule")
    apply(cluster, pod("waits-for-the-gpu", NS, templates={"gpu": "pinned"}))
    assert "cannot allocate all claims" in scheduling_message(cluster, NS, "waits-for-the-gpu")
    _simulate(healthy, "recover", f"--device={DEVICE}")
    wait_pod_ready(cluster, NS, "waits-for-the-gpu")
    delete(cluster, "pod", "waits-for-the-gpu", NS)
    wait_pod_gone(cluster, NS, "waits-for-the-gpu")


def test_a_noexecute_taint_evicts_the_pod_running_on_the_device(
    cluster: LocalCluster, healthy: PluginProcess, fault: Any
) -> None:
    apply(cluster, pod("evicted", NS, templates={"gpu": "pinned"}))
    wait_pod_ready(cluster, NS, "evicted")
    (taint,) = fault("xid-79")
    assert taint["effect"] == "NoExecute"
    wait_pod_gone(cluster, NS, "evicted")


def test_a_fault_shows_in_the_pods_status_and_in_the_claims_and_clears(
    cluster: LocalCluster, healthy: PluginProcess, fault: Any
) -> None:
    apply(cluster, pod("watched", NS, templates={"gpu": "pinned"}))
    wait_pod_ready(cluster, NS, "watched")
    (claim,) = pod_claims(cluster, NS, "watched")
    fault("xid-119")  # NoSchedule: the pod keeps running on the faulty device

    def resource_health() -> dict[str, Any] | None:
        status = (pod_object(cluster, NS, "watched") or {}).get("status", {})
        for container in status.get("containerStatuses", []):
            for resource in container.get("allocatedResourcesStatus") or []:
                return resource
        return None

    def health_is(state: str) -> bool:
        resource = resource_health()
        return bool(resource) and all(r["health"] == state for r in resource["resources"])

    wait_until(lambda: health_is("Unhealthy"), timeout=30, what="Unhealthy in the pod status")
    resource = resource_health()
    assert resource is not None and resource["name"].startswith("claim:")
    assert [r["resourceID"] for r in resource["resources"]] == list(
        healthy.checkpoint()[claim["metadata"]["uid"]].devices[0].cdi_ids
    )

    def device_conditions() -> list[dict[str, Any]]:
        found = get(
            cluster,
            f"/apis/resource.k8s.io/v1/namespaces/{NS}/resourceclaims/{claim['metadata']['name']}",
        )
        devices = (found or {}).get("status", {}).get("devices", [])
        return [c for d in devices if d["device"] == DEVICE for c in d.get("conditions", [])]

    wait_until(
        lambda: any(c["status"] == "False" for c in device_conditions()),
        timeout=30,
        what="the claim's device status to say so",
    )
    _simulate(healthy, "recover", f"--device={DEVICE}")
    wait_until(lambda: health_is("Healthy"), timeout=30, what="Healthy in the pod status again")
    delete(cluster, "pod", "watched", NS)
    wait_pod_gone(cluster, NS, "watched")


@pytest.mark.parametrize("effect", ["NoSchedule", "NoExecute"])
def test_an_admins_device_taint_rule_works_like_the_drivers_taint(
    cluster: LocalCluster, healthy: PluginProcess, effect: str
) -> None:
    name = f"rule-{effect.lower()}"
    apply(cluster, pod(name, NS, templates={"gpu": "pinned"}))
    wait_pod_ready(cluster, NS, name)
    rule = {
        "apiVersion": "resource.k8s.io/v1beta2",
        "kind": "DeviceTaintRule",
        "metadata": {"name": "maintenance"},
        "spec": {
            "deviceSelector": {"driver": "unidra.dev", "pool": cluster.node_name, "device": DEVICE},
            "taint": {"key": "example.com/maintenance", "value": "repair", "effect": effect},
        },
    }
    apply(cluster, rule)
    try:
        if effect == "NoExecute":
            wait_pod_gone(cluster, NS, name)
        else:
            late = f"{name}-late"
            apply(cluster, pod(late, NS, templates={"gpu": "pinned"}))
            assert "cannot allocate all claims" in scheduling_message(cluster, NS, late)
            delete(cluster, "pod", late, NS)
            assert pod_object(cluster, NS, name) is not None  # NoSchedule leaves running pods be
    finally:
        delete(cluster, "devicetaintrule", "maintenance")
        delete(cluster, "pod", name, NS)
        wait_pod_gone(cluster, NS, name)
