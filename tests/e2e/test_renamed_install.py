"""Install anywhere, on the real API server and kubelet: a second Unidra with its own namespace,
driver name, ServiceAccount and image (set as docs/install.md tells operators), next to the
default install, keeps the ResourceSlice protection, shares no cluster-wide object with it, and
serves pods through the renamed DeviceClasses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.plugin import (
    REPO,
    PluginProcess,
    apply,
    can_i,
    claim_template,
    container_cdi_devices,
    create_as,
    daemonset_pod,
    delete_pods,
    device_request,
    driver_kubeconfig,
    ensure_namespace,
    get,
    pod,
    pod_claims,
    probe_slice,
    published_devices,
    type_checking,
    wait_pod_ready,
)
from e2e.pod_layout import doctor_in_pod

from driver.localcluster import LocalCluster
from support import kustomize
from support.waiting import wait_until

NAMESPACE = "acme-gpu"
DRIVER = "gpu.acme.example"
ACCOUNT = "acme-driver"
IMAGE = "registry.example.com/acme/unidra:1.2.3"
USER = f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}"
DEFAULT_USER = "system:serviceaccount:unidra:unidra"
POLICIES = (f"{ACCOUNT}-resourceslices", f"{ACCOUNT}-opaque-config")
WORKLOADS = "e2e-renamed"


def write_overlay(directory: Path) -> Path:
    """The operator's kustomization: their own namespace and a copy of settings.yaml, edited."""
    settings = yaml.safe_load((REPO / "manifests/settings/settings.yaml").read_text())
    settings["data"].update(
        driverName=DRIVER, serviceAccount=ACCOUNT, image=IMAGE, imagePullPolicy="IfNotPresent"
    )
    (directory / "settings.yaml").write_text(yaml.safe_dump(settings))
    manifests = os.path.relpath(REPO / "manifests", directory)
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "resources": [f"{manifests}/base", "settings.yaml"],
                "components": [
                    f"{manifests}/components/simulated",
                    f"{manifests}/components/settings",
                ],
            }
        )
    )
    return directory


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_overlay(tmp_path_factory.mktemp("acme"))


@pytest.fixture(scope="module")
def renamed(cluster: LocalCluster, installed: str, overlay: Path) -> Iterator[str]:
    """The renamed overlay applied beside the default install; yields kubectl's stderr."""
    done = cluster.kubectl("apply", "-k", str(overlay))
    wait_until(
        lambda: daemonset_pod(cluster, NAMESPACE), timeout=60, what="the renamed DaemonSet's pod"
    )
    # The API server enforces a new policy once its informer has it, about a second later.
    wait_until(
        lambda: create_as(cluster, USER, "node-a", probe_slice("node-b", DRIVER))[0] != 0,
        timeout=30,
        what="the renamed ResourceSlice policy to be enforced",
    )
    try:
        yield done.stderr
    finally:
        cluster.kubectl("delete", "-k", str(overlay), "--wait=false", timeout=120)
        cluster.kubectl("delete", "resourceslices", f"--field-selector=spec.driver={DRIVER}")


@pytest.fixture(scope="module")
def renamed_plugin(cluster: LocalCluster, renamed: str) -> Iterator[PluginProcess]:
    """`unidra kubelet-plugin --driver-name gpu.acme.example` with its pod's token."""
    with PluginProcess(
        cluster,
        driver=DRIVER,
        kubeconfig=driver_kubeconfig(cluster, NAMESPACE, ACCOUNT),
        name="acme-plugin",
    ) as process:
        yield process


def cluster_object(cluster: LocalCluster, path: str) -> dict[str, Any]:
    found = get(cluster, path)
    assert found is not None, path
    return found


def test_the_renamed_install_applies_and_leaves_the_default_one_alone(
    cluster: LocalCluster, renamed: str
) -> None:
    assert "warning" not in renamed.lower(), renamed
    ds_pod = daemonset_pod(cluster, NAMESPACE)
    assert ds_pod is not None
    (container,) = ds_pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (container["image"], ds_pod["spec"]["serviceAccountName"]) == (IMAGE, ACCOUNT)
    assert env["UNIDRA_DRIVER_NAME"] == DRIVER
    rbac = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"
    (theirs,) = cluster_object(cluster, f"{rbac}/unidra-kubelet-plugin")["subjects"]
    (ours,) = cluster_object(cluster, f"{rbac}/{ACCOUNT}-kubelet-plugin")["subjects"]
    assert (theirs["namespace"], theirs["name"]) == ("unidra", "unidra")
    assert (ours["namespace"], ours["name"]) == (NAMESPACE, ACCOUNT)
    classes = "/apis/resource.k8s.io/v1/deviceclasses"
    for name, driver in (("gpu.unidra.dev", "unidra.dev"), (f"gpu.{DRIVER}", DRIVER)):
        (selector,) = cluster_object(cluster, f"{classes}/{name}")["spec"]["selectors"]
        assert selector["cel"]["expression"].startswith(f'device.driver == "{driver}"')


@pytest.mark.parametrize("policy", POLICIES)
def test_the_renamed_policies_type_check_without_warnings(
    cluster: LocalCluster, renamed: str, policy: str
) -> None:
    assert type_checking(cluster, policy).get("expressionWarnings", []) == []


def test_the_renamed_driver_may_write_only_its_own_nodes_slices(
    cluster: LocalCluster, renamed: str
) -> None:
    code, error = create_as(cluster, USER, "node-a", probe_slice("node-b", DRIVER))
    assert code != 0
    assert f"{ACCOUNT}-resourceslices" in error, error
    assert "may write only ResourceSlices with spec.nodeName node-a" in error
    code, error = create_as(cluster, USER, "node-a", probe_slice("node-a", DRIVER))
    assert code == 0, error


@pytest.mark.parametrize(
    "user",
    [
        DEFAULT_USER,  # the default install's account, which RBAC lets write slices
        f"system:serviceaccount:{NAMESPACE}:unidra",  # the old default name in the new namespace
    ],
)
def test_the_old_default_account_may_not_write_the_renamed_drivers_slices(
    cluster: LocalCluster, renamed: str, user: str
) -> None:
    code, error = create_as(cluster, user, "node-a", probe_slice("node-a", DRIVER))
    assert code != 0
    assert "denied" in error or "forbidden" in error, error


def test_the_renamed_policy_admits_no_other_account_to_the_renamed_drivers_slices(
    cluster: LocalCluster, renamed: str
) -> None:
    # An account that RBAC lets write slices but that only the renamed policy restricts (the
    # default policy judges only its own driver's slices and accounts named unidra).
    other = "slice-writer"
    apply(
        cluster,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": other},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"{ACCOUNT}-kubelet-plugin",
            },
            "subjects": [{"kind": "ServiceAccount", "name": other, "namespace": NAMESPACE}],
        },
    )
    try:
        user = f"system:serviceaccount:{NAMESPACE}:{other}"
        wait_until(
            lambda: can_i(cluster, user, "create", "resourceslices.resource.k8s.io"),
            timeout=10,
            what="the binding to take effect",
        )
        code, error = create_as(cluster, user, "node-a", probe_slice("node-a", DRIVER))
        assert code != 0
        assert f"'{ACCOUNT}-resourceslices' with binding '{ACCOUNT}-resourceslices' denied" in error
        assert (
            f"ResourceSlices of driver {DRIVER} may be written only by its service account "
            f"{ACCOUNT}, not {user}"
        ) in error
        # The same account's slices of another driver are no business of the renamed policy.
        code, error = create_as(cluster, user, "node-a", probe_slice("node-a", "other.example"))
        assert code == 0, error
    finally:
        cluster.kubectl("delete", "clusterrolebinding", other)


@pytest.mark.parametrize(
    ("resource", "allowed"),
    [
        (f"resourceclaims.resource.k8s.io/driver/{DRIVER}", True),
        ("resourceclaims.resource.k8s.io/driver/unidra.dev", False),
    ],
)
def test_the_renamed_account_updates_device_status_only_for_its_driver(
    cluster: LocalCluster, renamed: str, resource: str, allowed: bool
) -> None:
    assert can_i(cluster, USER, "associated-node:update", resource) is allowed


def test_the_renamed_plugin_registers_and_a_pod_gets_its_device(
    cluster: LocalCluster, renamed_plugin: PluginProcess
) -> None:
    devices = wait_until(
        lambda: published_devices(cluster, DRIVER), timeout=30, what="the renamed driver's pool"
    )
    assert len(devices) == 8
    ensure_namespace(cluster, WORKLOADS)
    try:
        apply(
            cluster,
            claim_template(
                "acme-gpu",
                WORKLOADS,
                {"devices": {"requests": [device_request(device_class=f"gpu.{DRIVER}")]}},
            ),
            pod("uses-acme-gpu", WORKLOADS, templates={"gpu": "acme-gpu"}),
        )
        wait_pod_ready(cluster, WORKLOADS, "uses-acme-gpu")
        (claim,) = pod_claims(cluster, WORKLOADS, "uses-acme-gpu")
        (result,) = claim["status"]["allocation"]["devices"]["results"]
        assert result["driver"] == DRIVER
        uid = claim["metadata"]["uid"]
        assert container_cdi_devices(cluster, WORKLOADS, "uses-acme-gpu") == [
            f"k8s.{DRIVER}/claim={uid}-{result['device']}"
        ]
        assert renamed_plugin.samples("unidra_slice_syncs_total")[(("result", "success"),)] >= 1
        assert sum(renamed_plugin.samples("unidra_api_errors_total").values()) == 0
    finally:
        delete_pods(cluster, WORKLOADS)


def test_doctor_in_the_renamed_pod_checks_the_renamed_driver(
    cluster: LocalCluster, renamed_plugin: PluginProcess, overlay: Path
) -> None:
    (daemonset,) = [o for o in kustomize.render(overlay) if o["kind"] == "DaemonSet"]
    code, findings = doctor_in_pod(cluster, daemonset, NAMESPACE, ACCOUNT)
    assert code == 0, findings
    assert findings["plugin directory"] == ("ok", f"/var/lib/kubelet/plugins/{DRIVER} is writable")
    assert findings["daemon"][0] == "ok"
    status, detail = findings["permissions"]
    assert status == "ok"
    assert detail.endswith(f"associated-node:update on resourceclaims/driver named {DRIVER}")
