"""Install anywhere: a namespace, ServiceAccount, driver name and image changed in the one place
(kustomize's `namespace:` and the settings file) reach everything that depends on them, and the
ResourceSlice admission policy never fails open when a name changes without it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from component.test_admission import (
    GOOD,
    claim_request,
    exactly,
    opaque_entry,
    resource_slice,
    slice_request,
)

from support import admission, kustomize

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
SETTINGS = """apiVersion: v1
kind: ConfigMap
metadata:
  name: unidra-settings
  annotations: {config.kubernetes.io/local-config: "true"}
data:
  driverName: gpu.example.com
  serviceAccount: gpu-driver
  image: registry.example.com/unidra:1.2.3
  imagePullPolicy: IfNotPresent
"""
ACCOUNT = "system:serviceaccount:gpu-system:gpu-driver"


COMPONENTS = ("nvidia", "extended-resources", "fleet", "nfd", "settings")


def install(directory: Path, namespace: str = "", settings: str = "") -> Path:
    """An operator's kustomization with the components that add cluster-wide objects."""
    relative = os.path.relpath(MANIFESTS, directory)
    if settings:
        (directory / "settings.yaml").write_text(settings)
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        + (f"namespace: {namespace}\n" if namespace else "")
        + f"resources:\n  - {relative}/base\n"
        + ("  - settings.yaml\n" if settings else f"  - {relative}/settings\n")
        + "components:\n"
        + "".join(f"  - {relative}/components/{name}\n" for name in COMPONENTS)
    )
    return directory


@pytest.fixture(scope="module")
def renamed(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    directory = install(tmp_path_factory.mktemp("renamed"), "gpu-system", SETTINGS)
    return {(o["kind"], o["metadata"]["name"]): o for o in kustomize.render(directory)}


def test_every_dependent_field_follows(renamed: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert ("Namespace", "gpu-system") in renamed and ("ServiceAccount", "gpu-driver") in renamed
    assert ("ConfigMap", "unidra-settings") not in renamed  # read by kustomize, never applied
    ds = renamed[("DaemonSet", "unidra-kubelet-plugin")]
    pod = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["namespace"] == "gpu-system" and pod["serviceAccountName"] == "gpu-driver"
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/unidra:1.2.3"
    assert container["imagePullPolicy"] == "IfNotPresent"
    fleet = renamed[("Deployment", "unidra-fleet")]["spec"]["template"]["spec"]["containers"][0]
    assert (fleet["image"], fleet["imagePullPolicy"]) == (
        "registry.example.com/unidra:1.2.3",
        "IfNotPresent",
    )
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["UNIDRA_DRIVER_NAME"] == "gpu.example.com"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    paths = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    assert mounts["plugin-dir"] == paths["plugin-dir"] == "/var/lib/kubelet/plugins/gpu.example.com"
    binding = renamed[("ClusterRoleBinding", "gpu-driver-kubelet-plugin")]
    (subject,) = binding["subjects"]
    assert (subject["name"], subject["namespace"]) == ("gpu-driver", "gpu-system")
    assert binding["roleRef"]["name"] == "gpu-driver-kubelet-plugin"
    role = renamed[("ClusterRole", "gpu-driver-kubelet-plugin")]
    named = [r for r in role["rules"] if "resourceNames" in r]
    assert named == [
        {
            "apiGroups": ["resource.k8s.io"],
            "resources": ["resourceclaims/driver"],
            "resourceNames": ["gpu.example.com"],
            "verbs": ["associated-node:update"],
        }
    ]
    classes = [o for (kind, _), o in renamed.items() if kind == "DeviceClass"]
    for item in classes:
        assert item["metadata"]["name"].endswith(".gpu.example.com")
        expression = item["spec"]["selectors"][0]["cel"]["expression"]
        assert expression.startswith('device.driver == "gpu.example.com"')
        assert '"unidra.dev"' not in expression
    assert ("DeviceClass", "gpu.gpu.example.com") in renamed
    opaque = renamed[("ValidatingAdmissionPolicy", "gpu-driver-opaque-config")]
    assert {"name": "driver", "expression": '"gpu.example.com"'} in opaque["spec"]["variables"]
    for name in ("gpu-driver-opaque-config", "gpu-driver-resourceslices"):
        binding = renamed[("ValidatingAdmissionPolicyBinding", name)]
        assert binding["spec"]["policyName"] == name


def test_no_cluster_wide_name_is_shared_with_the_default_install(
    renamed: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    """Two installs in one cluster: no cluster-scoped object of one overwrites the other's."""
    default = {(o["kind"], o["metadata"]["name"]) for o in kustomize.render(install(tmp_path))}
    assert ("NodeFeatureRule", "unidra-accelerators") in default
    shared = {
        (kind, name)
        for kind, name in default & set(renamed)
        if kind in kustomize.CLUSTER_SCOPED and kind != "Namespace"
    }
    assert shared == set()
    extended = [o for o in renamed.values() if o.get("spec", {}).get("extendedResourceName")]
    assert {o["spec"]["extendedResourceName"] for o in extended} >= {"gpu.example.com/gpu"}


def test_the_renamed_policy_restricts_the_renamed_account(
    renamed: dict[tuple[str, str], dict[str, Any]],
) -> None:
    policy = renamed[("ValidatingAdmissionPolicy", "gpu-driver-resourceslices")]
    ours = resource_slice(driver="gpu.example.com")
    own = admission.evaluate(policy, slice_request("CREATE", "node-a", ours, user=ACCOUNT))
    assert own.matched and own.allowed, own.denials
    other_node = admission.evaluate(policy, slice_request("CREATE", "node-b", ours, user=ACCOUNT))
    assert not other_node.allowed
    assert other_node.denials == (
        "the gpu-driver service account on node node-b may write only ResourceSlices with "
        "spec.nodeName node-b",
    )
    # Nobody else's service account writes this driver's slices.
    stale = admission.evaluate(policy, slice_request("CREATE", "node-a", ours))
    assert not stale.allowed


@pytest.mark.parametrize(
    ("device_class", "strategy", "allowed"),
    [
        ("nvidia.gpu.example.com", "MPS", True),
        ("amd.gpu.example.com", "MPS", False),
        ("npu.gpu.example.com", "TimeSlicing", False),
        ("npu.gpu.example.com", "Exclusive", True),
    ],
)
def test_the_renamed_opaque_policy_checks_sharing_against_the_renamed_classes(
    renamed: dict[tuple[str, str], dict[str, Any]], device_class: str, strategy: str, allowed: bool
) -> None:
    policy = renamed[("ValidatingAdmissionPolicy", "gpu-driver-opaque-config")]
    config = opaque_entry({**GOOD, "sharing": {"strategy": strategy}}, driver="gpu.example.com")
    request = claim_request("ResourceClaim", [config], [exactly("dev", device_class)])
    verdict = admission.evaluate(policy, request)
    assert verdict.allowed == allowed, verdict.denials


def default_policy() -> dict[str, Any]:
    objects = kustomize.render(MANIFESTS)
    return next(
        o
        for o in objects
        if o["kind"] == "ValidatingAdmissionPolicy"
        and o["metadata"]["name"] == "unidra-resourceslices"
    )


@pytest.mark.parametrize(
    ("case", "user", "driver"),
    [
        # The ServiceAccount renamed (or prefixed) without the policy: the driver's writes are denied.
        ("account renamed", "system:serviceaccount:unidra:renamed", "unidra.dev"),
        ("account prefixed", "system:serviceaccount:unidra:team-unidra", "unidra.dev"),
        # The driver renamed without the policy: its account may not write the new driver's slices.
        ("driver renamed", "system:serviceaccount:unidra:unidra", "gpu.example.com"),
    ],
)
def test_a_rename_without_the_policy_denies_instead_of_failing_open(
    case: str, user: str, driver: str
) -> None:
    for node in ("node-a", "node-b"):
        verdict = admission.evaluate(
            default_policy(),
            slice_request("CREATE", node, resource_slice(driver=driver), user=user),
        )
        assert verdict.matched and not verdict.allowed, (case, node)


def test_another_namespace_keeps_the_protection() -> None:
    """kustomize's `namespace:` moves the account; the policy still restricts it."""
    moved = "system:serviceaccount:gpu-system:unidra"
    policy = default_policy()
    assert admission.evaluate(
        policy, slice_request("CREATE", "node-a", resource_slice(), user=moved)
    ).allowed
    assert not admission.evaluate(
        policy, slice_request("CREATE", "node-b", resource_slice(), user=moved)
    ).allowed


def test_kube_system_controllers_and_people_are_not_restricted() -> None:
    policy = default_policy()
    collector = "system:serviceaccount:kube-system:generic-garbage-collector"
    for user in (collector, "system:admin", "system:node:node-b"):
        verdict = admission.evaluate(
            policy, slice_request("DELETE", None, None, resource_slice("node-b"), user=user)
        )
        assert not verdict.matched, user


def test_other_drivers_service_accounts_keep_writing_their_own_slices() -> None:
    nvidia = "system:serviceaccount:nvidia-dra:nvidia-dra-driver"
    verdict = admission.evaluate(
        default_policy(),
        slice_request(
            "CREATE", "node-b", resource_slice("node-c", driver="gpu.nvidia.com"), user=nvidia
        ),
    )
    assert verdict.allowed, verdict.denials
