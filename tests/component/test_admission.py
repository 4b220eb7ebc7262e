"""The admission policies in manifests/base, evaluated as the API server would:

- opaque DeviceConfig: the policy's CEL and the driver's own decoder (driver/opaque.py) give the
  same verdict on one table of good and bad configs, in claims, templates and DeviceClasses;
- ResourceSlices: the driver's service account writes only its own driver's slices of its own node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from driver import opaque
from driver.errors import ConfigError
from support import admission

BASE = Path(__file__).resolve().parents[2] / "manifests" / "base"
GOOD = {"apiVersion": "resource.unidra.dev/v1alpha1", "kind": "DeviceConfig"}
SERVICE_ACCOUNT = "system:serviceaccount:unidra:unidra"


def policy(name: str) -> dict[str, Any]:
    return next(
        o
        for o in yaml.safe_load_all((BASE / name).read_text())
        if o["kind"] == "ValidatingAdmissionPolicy"
    )


CONFIGS: list[tuple[str, Any]] = [
    ("minimal", GOOD),
    ("with env", {**GOOD, "env": {"NCCL_DEBUG": "INFO", "_UNDERSCORE": "", "A1": "x" * 1024}}),
    ("empty env", {**GOOD, "env": {}}),
    ("32 variables", {**GOOD, "env": {f"V{i}": "1" for i in range(32)}}),
    ("33 variables", {**GOOD, "env": {f"V{i}": "1" for i in range(33)}}),
    ("wrong apiVersion", {**GOOD, "apiVersion": "resource.unidra.dev/v1"}),
    ("no apiVersion", {"kind": "DeviceConfig"}),
    ("wrong kind", {**GOOD, "kind": "GpuConfig"}),
    ("no kind", {"apiVersion": GOOD["apiVersion"]}),
    ("unknown field", {**GOOD, "share": {"strategy": "TimeSlicing"}}),
    ("typo of env", {**GOOD, "envs": {"A": "b"}}),
    ("env is a list", {**GOOD, "env": ["A=b"]}),
    ("env is a string", {**GOOD, "env": "A=b"}),
    ("number value", {**GOOD, "env": {"A": 1}}),
    ("boolean value", {**GOOD, "env": {"A": True}}),
    ("object value", {**GOOD, "env": {"A": {"b": "c"}}}),
    ("name starts with a digit", {**GOOD, "env": {"1A": "x"}}),
    ("name with a dash", {**GOOD, "env": {"A-B": "x"}}),
    ("name with a dot", {**GOOD, "env": {"A.B": "x"}}),
    ("empty name", {**GOOD, "env": {"": "x"}}),
    ("128-character name", {**GOOD, "env": {"A" * 128: "x"}}),
    ("129-character name", {**GOOD, "env": {"A" * 129: "x"}}),
    ("reserved UNIDRA_", {**GOOD, "env": {"UNIDRA_VISIBLE": "x"}}),
    ("reserved DRA_", {**GOOD, "env": {"DRA_X": "x"}}),
    ("reserved-looking but fine", {**GOOD, "env": {"XUNIDRA_": "x", "DRAFT": "x"}}),
    ("value too long", {**GOOD, "env": {"A": "x" * 1025}}),
    ("not an object", ["DeviceConfig"]),
    ("a string", "DeviceConfig"),
    # The sharing section (docs/sharing.md).
    ("MPS", {**GOOD, "sharing": {"strategy": "MPS"}}),
    ("Exclusive", {**GOOD, "sharing": {"strategy": "Exclusive"}}),
    ("time-slicing", {**GOOD, "sharing": {"strategy": "TimeSlicing"}}),
    ("a long time slice", {**GOOD, "sharing": {"strategy": "TimeSlicing", "interval": "Long"}}),
    (
        "MPS limits",
        {**GOOD, "sharing": {"strategy": "MPS", "limits": {"memory": "20Gi", "computeUnits": 33}}},
    ),
    ("a plain byte limit", {**GOOD, "sharing": {"strategy": "MPS", "limits": {"memory": "1000"}}}),
    ("a CU mask", {**GOOD, "sharing": {"strategy": "TimeSlicing", "limits": {"computeUnits": 8}}}),
    ("no strategy", {**GOOD, "sharing": {}}),
    ("unknown strategy", {**GOOD, "sharing": {"strategy": "Shared"}}),
    ("strategy in lower case", {**GOOD, "sharing": {"strategy": "mps"}}),
    ("strategy a number", {**GOOD, "sharing": {"strategy": 1}}),
    ("sharing is null", {**GOOD, "sharing": None}),
    ("sharing is a string", {**GOOD, "sharing": "MPS"}),
    ("sharing unknown field", {**GOOD, "sharing": {"strategy": "MPS", "mode": "x"}}),
    ("interval with MPS", {**GOOD, "sharing": {"strategy": "MPS", "interval": "Short"}}),
    ("unknown interval", {**GOOD, "sharing": {"strategy": "TimeSlicing", "interval": "Fast"}}),
    ("limits when Exclusive", {**GOOD, "sharing": {"strategy": "Exclusive", "limits": {}}}),
    ("limits null", {**GOOD, "sharing": {"strategy": "MPS", "limits": None}}),
    ("unknown limit", {**GOOD, "sharing": {"strategy": "MPS", "limits": {"power": "100"}}}),
    ("decimal units", {**GOOD, "sharing": {"strategy": "MPS", "limits": {"memory": "20GB"}}}),
    ("zero memory", {**GOOD, "sharing": {"strategy": "MPS", "limits": {"memory": "0Gi"}}}),
    ("memory a number", {**GOOD, "sharing": {"strategy": "MPS", "limits": {"memory": 20}}}),
    ("fractional memory", {**GOOD, "sharing": {"strategy": "MPS", "limits": {"memory": "1.5Gi"}}}),
    (
        "memory without MPS",
        {**GOOD, "sharing": {"strategy": "TimeSlicing", "limits": {"memory": "20Gi"}}},
    ),
    ("zero compute", {**GOOD, "sharing": {"strategy": "MPS", "limits": {"computeUnits": 0}}}),
    ("compute a string", {**GOOD, "sharing": {"strategy": "MPS", "limits": {"computeUnits": "8"}}}),
    (
        "compute a fraction",
        {**GOOD, "sharing": {"strategy": "MPS", "limits": {"computeUnits": 1.5}}},
    ),
]


def driver_accepts(parameters: Any) -> bool:
    """Whether the driver's decoder takes the config (vendor rules wait for the device: below)."""
    try:
        opaque.decode(parameters, "parameters")
    except ConfigError:
        return False
    return True


def claim_request(
    kind: str,
    configs: list[dict[str, Any]],
    requests: list[dict[str, Any]] | None = None,
    name: str = "x",
) -> dict[str, Any]:
    devices = {
        "requests": requests or [{"name": "gpu", "exactly": {"deviceClassName": "gpu.unidra.dev"}}]
    }
    if kind == "ResourceClaim":
        obj: dict[str, Any] = {"spec": {"devices": {**devices, "config": configs}}}
    elif kind == "ResourceClaimTemplate":
        obj = {"spec": {"spec": {"devices": {**devices, "config": configs}}}}
    else:
        obj = {"spec": {"selectors": [], "config": configs}}
    obj["metadata"] = {"name": name, "namespace": "default"}
    return {
        "operation": "CREATE",
        "kind": {"group": "resource.k8s.io", "version": "v1", "kind": kind},
        "userInfo": {"username": "alice"},
        "object": {"apiVersion": "resource.k8s.io/v1", "kind": kind, **obj},
        "oldObject": None,
    }


def opaque_entry(parameters: Any, driver: str = "unidra.dev") -> dict[str, Any]:
    return {"opaque": {"driver": driver, "parameters": parameters}}


@pytest.mark.parametrize(("case", "parameters"), CONFIGS, ids=[c for c, _ in CONFIGS])
@pytest.mark.parametrize("kind", ["ResourceClaim", "ResourceClaimTemplate", "DeviceClass"])
def test_policy_and_driver_agree(case: str, parameters: Any, kind: str) -> None:
    verdict = admission.evaluate(
        policy("admission-opaque-config.yaml"), claim_request(kind, [opaque_entry(parameters)])
    )
    assert verdict.allowed == driver_accepts(parameters), verdict.denials


def test_the_table_has_both_verdicts() -> None:
    verdicts = {driver_accepts(p) for _, p in CONFIGS}
    assert verdicts == {True, False}


def test_config_of_other_drivers_and_claims_without_config_pass() -> None:
    rules = policy("admission-opaque-config.yaml")
    other = claim_request("ResourceClaim", [opaque_entry({"anything": 1}, driver="gpu.nvidia.com")])
    assert admission.evaluate(rules, other).allowed
    bare = claim_request("ResourceClaim", [])
    del bare["object"]["spec"]["devices"]["config"]
    assert admission.evaluate(rules, bare).allowed


def test_the_denial_says_what_is_wrong() -> None:
    verdict = admission.evaluate(
        policy("admission-opaque-config.yaml"),
        claim_request("ResourceClaim", [opaque_entry({**GOOD, "env": {"UNIDRA_X": "1"}})]),
    )
    assert verdict.denials == (
        "DeviceConfig env names must match [A-Za-z_][A-Za-z0-9_]*, have at most 128 characters, "
        "and not start with UNIDRA_ or DRA_",
    )


def sharing(strategy: str, **more: Any) -> dict[str, Any]:
    return opaque_entry({**GOOD, "sharing": {"strategy": strategy, **more}})


def exactly(name: str, device_class: str) -> dict[str, Any]:
    return {"name": name, "exactly": {"deviceClassName": device_class}}


VENDOR_CASES = [
    # (what, configs, requests, allowed)
    ("MPS on NVIDIA", [sharing("MPS")], [exactly("gpu", "nvidia.unidra.dev")], True),
    ("MPS on any GPU", [sharing("MPS")], [exactly("gpu", "gpu.unidra.dev")], True),
    ("MPS on AMD", [sharing("MPS")], [exactly("gpu", "amd.unidra.dev")], False),
    ("MPS on Intel", [sharing("MPS")], [exactly("gpu", "intel.unidra.dev")], False),
    (
        "a time slice on AMD",
        [sharing("TimeSlicing", interval="Short")],
        [exactly("gpu", "amd.unidra.dev")],
        False,
    ),
    ("time-slicing on AMD", [sharing("TimeSlicing")], [exactly("gpu", "amd.unidra.dev")], True),
    ("time-slicing an NPU", [sharing("TimeSlicing")], [exactly("npu", "npu.unidra.dev")], False),
    ("time-slicing a TPU", [sharing("TimeSlicing")], [exactly("tpu", "google.unidra.dev")], False),
    ("sharing a partition", [sharing("MPS")], [exactly("mig", "partition.unidra.dev")], False),
    ("a Gaudi exclusively", [sharing("Exclusive")], [exactly("hpu", "hpu.unidra.dev")], True),
    (
        "config for the NVIDIA request only",
        [{**sharing("MPS"), "requests": ["gpu"]}],
        [exactly("gpu", "nvidia.unidra.dev"), exactly("npu", "npu.unidra.dev")],
        True,
    ),
    (
        "config for every request",
        [sharing("MPS")],
        [exactly("gpu", "nvidia.unidra.dev"), exactly("npu", "npu.unidra.dev")],
        False,
    ),
    (
        "a subrequest of another vendor",
        [{**sharing("MPS"), "requests": ["gpu/amd"]}],
        [
            {
                "name": "gpu",
                "firstAvailable": [
                    {"name": "nv", "deviceClassName": "nvidia.unidra.dev"},
                    {"name": "amd", "deviceClassName": "amd.unidra.dev"},
                ],
            }
        ],
        False,
    ),
]


@pytest.mark.parametrize(
    ("what", "configs", "requests", "allowed"), VENDOR_CASES, ids=[c[0] for c in VENDOR_CASES]
)
@pytest.mark.parametrize("kind", ["ResourceClaim", "ResourceClaimTemplate"])
def test_sharing_fits_the_vendor_of_the_device_class(
    what: str,
    configs: list[dict[str, Any]],
    requests: list[dict[str, Any]],
    allowed: bool,
    kind: str,
) -> None:
    verdict = admission.evaluate(
        policy("admission-opaque-config.yaml"), claim_request(kind, configs, requests)
    )
    assert verdict.allowed == allowed, verdict.denials
    if not allowed:
        assert verdict.denials[0].startswith("DeviceConfig sharing does not fit the DeviceClass")


@pytest.mark.parametrize(
    ("name", "strategy", "allowed"),
    [
        ("nvidia.unidra.dev", "MPS", True),
        ("amd.unidra.dev", "MPS", False),
        ("amd.unidra.dev", "TimeSlicing", True),
        ("tpu.unidra.dev", "TimeSlicing", False),
        ("tpu.unidra.dev", "Exclusive", True),
    ],
)
def test_a_device_class_config_fits_the_class(name: str, strategy: str, allowed: bool) -> None:
    request = claim_request("DeviceClass", [sharing(strategy)], name=name)
    verdict = admission.evaluate(policy("admission-opaque-config.yaml"), request)
    assert verdict.allowed == allowed, verdict.denials


def slice_request(
    operation: str,
    node_of_token: str | None,
    new: dict[str, Any] | None,
    old: dict[str, Any] | None = None,
    user: str = SERVICE_ACCOUNT,
) -> dict[str, Any]:
    extra = {"authentication.kubernetes.io/node-name": [node_of_token]} if node_of_token else {}
    return {
        "operation": operation,
        "kind": {"group": "resource.k8s.io", "version": "v1", "kind": "ResourceSlice"},
        "userInfo": {"username": user, "extra": extra},
        "object": new,
        "oldObject": old,
    }


def resource_slice(node: str | None = "node-a", driver: str = "unidra.dev") -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": driver, "pool": {"name": node or "fabric"}}
    if node:
        spec["nodeName"] = node
    else:
        spec["allNodes"] = True
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "spec": spec}


@pytest.mark.parametrize(
    ("request_", "allowed"),
    [
        (slice_request("CREATE", "node-a", resource_slice()), True),
        (slice_request("UPDATE", "node-a", resource_slice(), resource_slice()), True),
        (slice_request("DELETE", "node-a", None, resource_slice()), True),
        (slice_request("CREATE", "node-b", resource_slice()), False),
        (slice_request("DELETE", "node-b", None, resource_slice()), False),
        (slice_request("CREATE", "node-a", resource_slice(driver="gpu.nvidia.com")), False),
        (slice_request("CREATE", "node-a", resource_slice(node=None)), False),
        (slice_request("CREATE", None, resource_slice()), False),
        # Taking over another node's slice by rewriting its nodeName.
        (slice_request("UPDATE", "node-a", resource_slice(), resource_slice("node-b")), False),
        (
            slice_request(
                "UPDATE", "node-a", resource_slice(), resource_slice(driver="gpu.nvidia.com")
            ),
            False,
        ),
    ],
)
def test_the_service_account_writes_only_its_own_slices(
    request_: dict[str, Any], allowed: bool
) -> None:
    verdict = admission.evaluate(policy("admission-resourceslices.yaml"), request_)
    assert verdict.matched and verdict.allowed == allowed, verdict.denials


def test_other_users_are_not_affected() -> None:
    verdict = admission.evaluate(
        policy("admission-resourceslices.yaml"),
        slice_request("CREATE", None, resource_slice("node-b"), user="system:admin"),
    )
    assert not verdict.matched


def test_the_denial_names_the_node() -> None:
    verdict = admission.evaluate(
        policy("admission-resourceslices.yaml"), slice_request("CREATE", "node-b", resource_slice())
    )
    assert verdict.denials == (
        "the unidra service account on node node-b may write only ResourceSlices with "
        "spec.nodeName node-b",
    )
