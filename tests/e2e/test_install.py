"""The install, judged by the real API server: manifests, admission policies, RBAC, config rejection."""

from __future__ import annotations

import json

import pytest
from e2e.plugin import (
    NAMESPACE,
    PluginProcess,
    can_i,
    create_as,
    ensure_namespace,
    probe_slice,
    published_devices,
    type_checking,
)

from driver.localcluster import LocalCluster

SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:unidra"
POLICIES = ("unidra-resourceslices", "unidra-opaque-config")


def test_kubectl_apply_of_the_simulated_overlay_is_accepted_without_warnings(
    installed: str,
) -> None:
    assert "warning" not in installed.lower(), installed


@pytest.mark.parametrize("policy", POLICIES)
def test_the_admission_policy_type_checks_on_the_real_api_server(
    cluster: LocalCluster, installed: str, policy: str
) -> None:
    assert type_checking(cluster, policy).get("expressionWarnings", []) == []


@pytest.mark.parametrize(
    ("verb", "resource"),
    [
        ("list", "resourceslices.resource.k8s.io"),
        ("watch", "resourceslices.resource.k8s.io"),
        ("create", "resourceslices.resource.k8s.io"),
        ("update", "resourceslices.resource.k8s.io"),
        ("delete", "resourceslices.resource.k8s.io"),
        ("get", "resourceclaims.resource.k8s.io"),
        ("update", "resourceclaims.resource.k8s.io/status"),
        ("associated-node:update", "resourceclaims.resource.k8s.io/driver/unidra.dev"),
        ("get", "nodes"),
    ],
)
def test_the_service_account_may_do_what_the_driver_does(
    cluster: LocalCluster, installed: str, verb: str, resource: str
) -> None:
    assert can_i(cluster, SERVICE_ACCOUNT, verb, resource)


@pytest.mark.parametrize(
    ("verb", "resource"),
    [
        ("patch", "resourceslices.resource.k8s.io"),
        ("deletecollection", "resourceslices.resource.k8s.io"),
        ("list", "resourceclaims.resource.k8s.io"),
        ("update", "resourceclaims.resource.k8s.io"),
        ("patch", "resourceclaims.resource.k8s.io/status"),
        ("associated-node:update", "resourceclaims.resource.k8s.io/driver/other.dev"),
        ("arbitrary-node:update", "resourceclaims.resource.k8s.io/driver/unidra.dev"),
        ("create", "deviceclasses.resource.k8s.io"),
        ("create", "devicetaintrules.resource.k8s.io"),
        ("list", "nodes"),
        ("update", "nodes"),
        ("get", "secrets"),
        ("list", "pods"),
    ],
)
def test_the_service_account_may_do_nothing_more(
    cluster: LocalCluster, installed: str, verb: str, resource: str
) -> None:
    assert not can_i(cluster, SERVICE_ACCOUNT, verb, resource)


def test_a_resourceslice_for_another_node_is_denied(cluster: LocalCluster, installed: str) -> None:
    code, error = create_as(cluster, SERVICE_ACCOUNT, "node-a", probe_slice("node-b"))
    assert code != 0
    assert "unidra-resourceslices" in error
    assert "may write only ResourceSlices with spec.nodeName node-a" in error
    code, error = create_as(cluster, SERVICE_ACCOUNT, "node-a", probe_slice("node-a"))
    assert code == 0, error


def test_the_driver_publishes_with_its_pod_bound_token(
    cluster: LocalCluster, plugin: PluginProcess
) -> None:
    # The plugin runs with a token bound to the DaemonSet's pod, as in the cluster: the policy
    # admits its own node's slices, and none of its API calls is refused.
    assert len(published_devices(cluster)) == 8
    assert plugin.samples("unidra_slice_syncs_total")[(("result", "success"),)] >= 1
    assert sum(plugin.samples("unidra_api_errors_total").values()) == 0


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        (
            {"apiVersion": "resource.unidra.dev/v1alpha1", "kind": "DeviceConfig", "envv": {}},
            "unknown field",
        ),
        (
            {
                "apiVersion": "resource.unidra.dev/v1alpha1",
                "kind": "DeviceConfig",
                "env": {"1X": "y"},
            },
            "env names",
        ),
        ({"apiVersion": "resource.unidra.dev/v9", "kind": "DeviceConfig"}, "apiVersion"),
        # The API server itself refuses these, before any admission policy runs.
        (["not", "an", "object"], "opaque.parameters: Invalid value"),
    ],
)
def test_an_invalid_opaque_config_is_rejected_when_the_claim_is_created(
    cluster: LocalCluster,
    installed: str,
    parameters: dict,
    named: str,  # type: ignore[type-arg]
) -> None:
    ensure_namespace(cluster, "e2e-install")
    claim = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "bad-config", "namespace": "e2e-install"},
        "spec": {
            "devices": {
                "requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.unidra.dev"}}],
                "config": [{"opaque": {"driver": "unidra.dev", "parameters": parameters}}],
            }
        },
    }
    done = cluster.kubectl(
        "create", "--dry-run=server", "-f", "-", input=json.dumps(claim), check=False
    )
    assert done.returncode != 0
    assert named in done.stderr, done.stderr
    assert "unidra-opaque-config" in done.stderr or "opaque.parameters" in done.stderr
