"""Shared devices on the real 1.36 scheduler and kubelet: consumable capacity end to end.

With `--sharing`, two pods whose claims ask for `capacity: {requests: {memory: 30Gi}}` land on
one 79.6 GiB GPU, each claim with its own shareID and consumedCapacity, each container with its
own CDI device `<claim>-<device>-<shareID>`, and the kubelet records the share IDs the plugin
answered. A third share would exceed the memory and stays pending with the scheduler's reason
until a share is released. Shares of a whole GPU and its MIG partitions exclude each other
through the counters. The admission policy judges the `sharing` config on the real API server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2e.plugin import (
    PluginProcess,
    apply,
    claim_template,
    container_cdi_devices,
    delete,
    ensure_namespace,
    pod,
    pod_claims,
    scheduling_message,
    wait_pod_gone,
    wait_pod_ready,
    wait_published,
)

from driver.localcluster import LocalCluster
from support.waiting import wait_until

NS = "e2e-sharing"
GPU = "gpu-0000-1b-00-0"
PINNED = 'device.attributes["resource.kubernetes.io"].pciBusID == "0000:1b:00.0"'


@pytest.fixture(scope="module")
def namespace(cluster: LocalCluster, installed: str) -> str:
    ensure_namespace(cluster, NS)
    return NS


def share_request(memory: str, device_class: str = "gpu.unidra.dev") -> dict[str, Any]:
    # The capacity is named as published, unqualified: `unidra.dev/memory` matches nothing.
    return {
        "name": "gpu",
        "exactly": {
            "deviceClassName": device_class,
            "selectors": [{"cel": {"expression": PINNED}}],
            "capacity": {"requests": {"memory": memory}},
        },
    }


def _result(claim: dict[str, Any]) -> dict[str, Any]:
    (result,) = claim["status"]["allocation"]["devices"]["results"]
    return result  # type: ignore[no-any-return]


def _remove(cluster: LocalCluster, *names: str) -> None:
    for name in names:
        delete(cluster, "pod", name, NS)
    for name in names:
        wait_pod_gone(cluster, NS, name)


def test_two_pods_share_one_gpu_and_a_third_waits_for_room(
    cluster: LocalCluster, namespace: str
) -> None:
    with PluginProcess(cluster, simulate="dgx-h100", args=["--sharing"]) as plugin:
        devices = wait_published(cluster, 8)
        assert devices[GPU]["allowMultipleAllocations"] is True
        assert devices[GPU]["attributes"]["sharing"] == {"string": "TimeSlicing"}
        apply(
            cluster,
            claim_template("share-30gi", NS, {"devices": {"requests": [share_request("30Gi")]}}),
        )
        claims = {}
        for name in ("share-a", "share-b"):
            apply(cluster, pod(name, NS, templates={"gpu": "share-30gi"}))
        for name in ("share-a", "share-b"):
            wait_pod_ready(cluster, NS, name)
            (claims[name],) = pod_claims(cluster, NS, name)

        results = {name: _result(claim) for name, claim in claims.items()}
        assert {r["device"] for r in results.values()} == {GPU}
        share_ids = {r["shareID"] for r in results.values()}
        assert len(share_ids) == 2
        for name, claim in claims.items():
            result, uid = results[name], claim["metadata"]["uid"]
            assert result["consumedCapacity"] == {"computeUnits": "0", "memory": "30Gi"}
            cdi_name = f"k8s.unidra.dev/claim={uid}-{GPU}-{result['shareID']}"
            assert container_cdi_devices(cluster, NS, name) == [cdi_name]
            (entry,) = plugin.checkpoint()[uid].devices
            assert (entry.share_id, entry.consumed["memory"]) == (result["shareID"], 30 << 30)
        # The kubelet keeps what the plugin answered, share IDs included (v1 Device field 5).
        state = (cluster.kubelet_root / "dra_manager_state").read_text()
        assert all(share_id in state for share_id in share_ids)

        # A third 30Gi share does not fit next to the two: the scheduler says so and waits.
        apply(cluster, pod("share-c", NS, templates={"gpu": "share-30gi"}))
        assert "cannot allocate all claims" in scheduling_message(cluster, NS, "share-c")

        # Releasing one share makes room: the third pod runs, the other share is untouched.
        uid_a = claims["share-a"]["metadata"]["uid"]
        _remove(cluster, "share-a")
        wait_until(lambda: uid_a not in plugin.checkpoint(), timeout=30, what="unprepare")
        wait_pod_ready(cluster, NS, "share-c")
        assert claims["share-b"]["metadata"]["uid"] in plugin.checkpoint()
        _remove(cluster, "share-b", "share-c")


def test_shares_of_a_gpu_and_its_partitions_exclude_each_other(
    cluster: LocalCluster, namespace: str
) -> None:
    """The shareable GPU consumes all of its counters once, however many shares it has."""
    with PluginProcess(cluster, simulate="dgx-h100", args=["--sharing", "--partitions"]):
        wait_until(lambda: GPU in wait_published(cluster, 8 + 8 * 25), what="GPUs and partitions")
        part = 'device.attributes["unidra.dev"].partitionProfile == "3g.40gb"'
        apply(
            cluster,
            claim_template("share-10gi", NS, {"devices": {"requests": [share_request("10Gi")]}}),
            claim_template(
                "a-mig-slice",
                NS,
                {
                    "devices": {
                        "requests": [
                            {
                                "name": "mig",
                                "exactly": {
                                    "deviceClassName": "partition.unidra.dev",
                                    "selectors": [
                                        {"cel": {"expression": PINNED}},
                                        {"cel": {"expression": part}},
                                    ],
                                },
                            }
                        ]
                    }
                },
            ),
        )
        for name in ("share-1", "share-2"):
            apply(cluster, pod(name, NS, templates={"gpu": "share-10gi"}))
        for name in ("share-1", "share-2"):
            wait_pod_ready(cluster, NS, name)  # two shares, one set of counters: both fit
        apply(cluster, pod("mig", NS, templates={"mig": "a-mig-slice"}))
        assert "cannot allocate all claims" in scheduling_message(cluster, NS, "mig")
        _remove(cluster, "share-1", "share-2")
        wait_pod_ready(cluster, NS, "mig")
        apply(cluster, pod("share-3", NS, templates={"gpu": "share-10gi"}))
        assert "cannot allocate all claims" in scheduling_message(cluster, NS, "share-3")
        _remove(cluster, "mig", "share-3")


@pytest.mark.parametrize(
    ("device_class", "sharing", "denied"),
    [
        ("nvidia.unidra.dev", {"strategy": "MPS", "limits": {"memory": "20Gi"}}, False),
        ("amd.unidra.dev", {"strategy": "MPS"}, True),
        ("npu.unidra.dev", {"strategy": "TimeSlicing"}, True),
        ("gpu.unidra.dev", {"strategy": "TimeSlicing", "interval": "Fast"}, True),
        ("gpu.unidra.dev", {"strategy": "TimeSlicing", "limits": {"memory": "2Gi"}}, True),
    ],
)
def test_the_real_api_server_judges_the_sharing_config(
    cluster: LocalCluster, namespace: str, device_class: str, sharing: dict[str, Any], denied: bool
) -> None:
    claim = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "sharing-config", "namespace": NS},
        "spec": {
            "devices": {
                "requests": [{"name": "gpu", "exactly": {"deviceClassName": device_class}}],
                "config": [
                    {
                        "opaque": {
                            "driver": "unidra.dev",
                            "parameters": {
                                "apiVersion": "resource.unidra.dev/v1alpha1",
                                "kind": "DeviceConfig",
                                "sharing": sharing,
                            },
                        }
                    }
                ],
            }
        },
    }
    done = cluster.kubectl(
        "create", "--dry-run=server", "-f", "-", input=json.dumps(claim), check=False
    )
    assert (done.returncode != 0) == denied, done.stderr
    if denied:
        assert "unidra-opaque-config" in done.stderr and "DeviceConfig sharing" in done.stderr
