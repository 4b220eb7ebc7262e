"""`unidra doctor` in the DaemonSet's own mount layout, against the real API server: a read-only
root, only the driver's plugin directory, the registration directory and the CDI directory
writable (as manifests/base/daemonset.yaml mounts them), and the pod-bound service-account token.
It tells the truth: no problems where the daemon works, and a named problem where it would not."""

from __future__ import annotations

from typing import Any

import pytest
from e2e.plugin import NAMESPACE, REPO, PluginProcess, apply, daemonset_pod
from e2e.pod_layout import doctor_in_pod, run_in_pod

from driver import kubeapi
from driver.localcluster import LocalCluster
from support import kustomize


@pytest.fixture(scope="module")
def daemonset() -> dict[str, Any]:
    """The DaemonSet as the simulated overlay renders it (what `installed` applied)."""
    objects = kustomize.render(REPO / "manifests/overlays/simulated")
    (found,) = [o for o in objects if o["kind"] == "DaemonSet"]
    return found


def test_the_pods_view_is_the_daemonsets(
    cluster: LocalCluster, installed: str, daemonset: dict[str, Any]
) -> None:
    pod = daemonset_pod(cluster, NAMESPACE)
    assert pod is not None
    probe = (
        "import os; print([os.access(p, os.W_OK) for p in ('/', '/var/lib/kubelet/plugins', "
        "'/var/lib/kubelet/plugins/unidra.dev', '/var/lib/kubelet/plugins_registry', "
        "'/var/run/cdi', '/host/sys', '/tmp')])"
    )
    done = run_in_pod(cluster, daemonset, pod["metadata"]["uid"], "t", ("-c", probe))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "[False,",
        "False,",
        "True,",
        "True,",
        "True,",
        "False,",
        "True]",
    ]


def test_doctor_in_the_pod_finds_no_problem_and_says_what_it_checked(
    cluster: LocalCluster, plugin: PluginProcess, daemonset: dict[str, Any]
) -> None:
    code, findings = doctor_in_pod(cluster, daemonset)
    assert code == 0, findings
    assert findings["plugin directory"] == (
        "ok",
        "/var/lib/kubelet/plugins/unidra.dev is writable",
    )
    assert findings["kubelet registration directory"][0] == "ok"
    assert findings["CDI directory"] == ("ok", "/var/run/cdi is writable")
    status, detail = findings["container runtime CDI"]
    assert status == "skip" and "not checked" in detail  # the pod does not mount the host's /etc
    assert findings["daemon"][0] == "ok"
    assert findings["node"] == ("ok", "node-a exists")
    assert findings["permissions"] == (
        "ok",
        f"all {len(kubeapi.PERMISSIONS)} API calls of the driver allowed, including "
        "associated-node:update on resourceclaims/driver named unidra.dev",
    )
    for check, gate in (
        ("device taints", "DRADeviceTaints"),
        ("partitions", "DRAPartitionableDevices"),
        ("consumable capacity", "DRAConsumableCapacity"),
    ):
        assert findings[check] == ("ok", f"{gate} is on")
    assert findings["API server"][0] == "ok"


def test_doctor_in_the_pod_names_a_node_that_does_not_exist(
    cluster: LocalCluster, installed: str, daemonset: dict[str, Any]
) -> None:
    code, findings = doctor_in_pod(cluster, daemonset, env={"NODE_NAME": "does-not-exist"})
    assert code == 1
    status, detail = findings["node"]
    assert status == "FAIL" and "no Node named 'does-not-exist'" in detail


def test_doctor_in_the_pod_names_a_permission_the_token_lacks(
    cluster: LocalCluster, installed: str, daemonset: dict[str, Any]
) -> None:
    role = cluster.get_json("/apis/rbac.authorization.k8s.io/v1/clusterroles/unidra-kubelet-plugin")
    rules = [r for r in role["rules"] if "resourceNames" not in r]
    assert len(rules) == len(role["rules"]) - 1
    name = "unidra-doctor-probe"
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": NAMESPACE},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}],
        },
    )
    try:
        token = cluster.kubectl("create", "token", name, "-n", NAMESPACE).stdout.strip()
        code, findings = doctor_in_pod(cluster, daemonset, token=token)
    finally:
        for kind in ("clusterrolebinding", "clusterrole"):
            cluster.kubectl("delete", kind, name)
        cluster.kubectl("delete", "serviceaccount", name, "-n", NAMESPACE)
    assert code == 1
    status, detail = findings["permissions"]
    assert status == "FAIL"
    assert "may not associated-node:update resourceclaims/driver.resource.k8s.io;" in detail
