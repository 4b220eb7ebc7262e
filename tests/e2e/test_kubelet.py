"""The real kubelet and Unidra: registration, a pod's claim prepared and unprepared, restarts of either side."""

from __future__ import annotations

import json
import signal

import pytest
from e2e.plugin import (
    PluginProcess,
    apply,
    claim_template,
    container_cdi_devices,
    delete,
    device_request,
    ensure_namespace,
    pod,
    pod_claims,
    wait_pod_gone,
    wait_pod_ready,
    wait_published,
)

from driver.localcluster import LocalCluster
from support.waiting import wait_until

NS = "e2e-kubelet"


@pytest.fixture(scope="module")
def namespace(cluster: LocalCluster) -> str:
    ensure_namespace(cluster, NS)
    apply(cluster, claim_template("one-gpu", NS, {"devices": {"requests": [device_request()]}}))
    return NS


def _run_pod(cluster: LocalCluster, name: str) -> tuple[dict, list[str]]:  # type: ignore[type-arg]
    apply(cluster, pod(name, NS, templates={"gpu": "one-gpu"}))
    wait_pod_ready(cluster, NS, name)
    (claim,) = pod_claims(cluster, NS, name)
    return claim, container_cdi_devices(cluster, NS, name)


def test_the_real_kubelet_registers_unidra_and_sees_its_pool(
    cluster: LocalCluster, plugin: PluginProcess
) -> None:
    devices = wait_published(cluster, 8)
    assert sorted(devices)[0] == "gpu-0000-1b-00-0"


def test_a_pod_with_a_claim_template_runs_with_unidras_cdi_devices(
    cluster: LocalCluster, plugin: PluginProcess, namespace: str
) -> None:
    claim, cdi = _run_pod(cluster, "uses-one-gpu")
    uid = claim["metadata"]["uid"]
    (result,) = claim["status"]["allocation"]["devices"]["results"]
    assert result["driver"] == "unidra.dev" and result["pool"] == cluster.node_name
    # The runtime got exactly the CDI device the driver prepared for the allocated device.
    assert cdi == [f"k8s.unidra.dev/claim={uid}-{result['device']}"]
    recorded = plugin.checkpoint()[uid]
    assert [d.cdi_ids for d in recorded.devices] == [tuple(cdi)]
    spec = json.loads((plugin.cdi_root / f"k8s.unidra.dev-claim_{uid}.json").read_text())
    assert [d["name"] for d in spec["devices"]] == [f"{uid}-{result['device']}"]

    delete(cluster, "pod", "uses-one-gpu", NS)
    wait_pod_gone(cluster, NS, "uses-one-gpu")
    spec = plugin.cdi_root / f"k8s.unidra.dev-claim_{uid}.json"
    # The record goes first, then the spec (a crash in between leaves an orphan spec, which
    # recovery removes).
    wait_until(lambda: uid not in plugin.checkpoint() and not spec.exists(), what="unprepare")


def test_restarting_the_plugin_while_a_pod_runs_loses_nothing(
    cluster: LocalCluster, plugin: PluginProcess, namespace: str
) -> None:
    claim, _ = _run_pod(cluster, "survives-restart")
    uid = claim["metadata"]["uid"]
    plugin.stop(signal.SIGKILL)
    plugin.start()
    assert uid in plugin.checkpoint()
    wait_pod_ready(cluster, NS, "survives-restart")
    delete(cluster, "pod", "survives-restart", NS)
    wait_until(lambda: uid not in plugin.checkpoint(), timeout=30, what="unprepare after restart")


def test_restarting_the_kubelet_registers_the_plugin_again(
    cluster: LocalCluster, plugin: PluginProcess, namespace: str
) -> None:
    since = len(cluster.components["kubelet"].output())
    cluster.restart_kubelet()
    plugin.wait_registered(since=since)
    wait_published(cluster, 8)  # kubelet wiped the slices at start; the plugin put them back
    claim, _ = _run_pod(cluster, "after-kubelet-restart")
    delete(cluster, "pod", "after-kubelet-restart", NS)
    uid = claim["metadata"]["uid"]
    wait_until(lambda: uid not in plugin.checkpoint(), timeout=30, what="unprepare")


def test_sigterm_removes_the_plugins_sockets(cluster: LocalCluster, plugin: PluginProcess) -> None:
    sockets = [cluster.registrar_dir / "unidra.dev-reg.sock", plugin.plugin_dir / "dra.sock"]
    assert all(s.exists() for s in sockets)
    assert plugin.stop(signal.SIGTERM) == 0
    assert not any(s.exists() for s in sockets)
    plugin.start()  # for the tests after this one
