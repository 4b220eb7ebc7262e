"""The operator workflows' manifests (docs/workflows/, components/extended-resources): valid for
Kubernetes 1.36, their DeviceClasses select what they say, and the quota and taint rule names meet
the classes and the fleet view. Their end-to-end tests run on a real cluster (tests/e2e/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from driver import inventory, slices
from driver.backends import BackendContext
from driver.fleet.view import Fleet
from support import cluster, dra_cel
from vendors.simulated import SimulatedBackend

REPO = Path(__file__).resolve().parents[2]
DRIVER = "unidra.dev"
WORKFLOWS = sorted((REPO / "docs/workflows").glob("*.yaml"))
EXTENDED = REPO / "manifests/components/extended-resources/deviceclasses.yaml"


def objects(path: Path) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all(path.read_text()) if o]


def classes(*paths: Path) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o for p in paths for o in objects(p) if o["kind"] == "DeviceClass"
    }


BASE = classes(REPO / "manifests/base/deviceclasses.yaml")


def published(profile: str, partitions: bool = False) -> list[dict[str, Any]]:
    backend = SimulatedBackend(BackendContext(node_name="node-a", options={"profile": profile}))
    return [
        d
        for c in slices.build(inventory.discover([backend], partitions=partitions))
        for d in c.devices
    ]


def selected(
    device_class: str, known: dict[str, Any], profile: str, partitions: bool = False
) -> set[str]:
    request = {"name": "r", "exactly": {"deviceClassName": device_class}}
    devices = published(profile, partitions)
    names = set(dra_cel.candidates(request, known, devices, DRIVER))
    return {d["attributes"]["model"]["string"] for d in devices if d["name"] in names}


def test_every_workflow_manifest_is_valid_for_kubernetes_1_36() -> None:
    assert [p.name for p in WORKFLOWS] == [
        "fair-sharing-quota.yaml",
        "training-node-pools.yaml",
        "training-taint-rule.yaml",
        "unmodified-pod.yaml",
    ]
    for path in [*WORKFLOWS, EXTENDED]:
        for item in objects(path):
            kubernetes_validate.validate(item, "1.36.0", strict=True)


def test_unmodified_pods_get_whole_devices_of_the_vendor_their_resource_names() -> None:
    extended = classes(EXTENDED)
    names = {c["spec"]["extendedResourceName"]: n for n, c in extended.items()}
    assert sorted(names) == ["amd.com/gpu", "nvidia.com/gpu", "unidra.dev/gpu"]
    assert selected(names["nvidia.com/gpu"], extended, "mixed") == {"NVIDIA H100 NVL"}
    assert selected(names["amd.com/gpu"], extended, "mixed") == {"AMD Instinct MI210"}
    assert selected(names["unidra.dev/gpu"], extended, "mixed") == {
        "NVIDIA H100 NVL",
        "AMD Instinct MI210",
        "Intel Data Center GPU Max 1100",
    }
    request = {"name": "r", "exactly": {"deviceClassName": names["nvidia.com/gpu"]}}
    whole = dra_cel.candidates(request, extended, published("dgx-h100", partitions=True), DRIVER)
    assert len(whole) == 8  # never a MIG slice for `nvidia.com/gpu: 1`
    (pod,) = objects(REPO / "docs/workflows/unmodified-pod.yaml")
    (container,) = pod["spec"]["containers"]
    assert set(container["resources"]["limits"]) <= set(names)
    assert "resourceClaims" not in pod["spec"]


def test_training_and_inference_classes_split_the_devices() -> None:
    known = classes(REPO / "docs/workflows/training-node-pools.yaml")
    assert selected("training.unidra.dev", known, "mixed") == {
        "NVIDIA H100 NVL",
        "AMD Instinct MI210",
    }
    assert selected("inference.unidra.dev", known, "mixed") == {
        "Intel Data Center GPU Max 1100",
        "FuriosaAI RNGD",
        "RBLN-CA12",
    }
    request = {"name": "r", "exactly": {"deviceClassName": "inference.unidra.dev"}}
    on_dgx = dra_cel.candidates(request, known, published("dgx-h100", partitions=True), DRIVER)
    assert on_dgx and all("-mig-" in name for name in on_dgx)


def test_the_training_taint_rule_reserves_a_node_and_only_training_tolerates_it() -> None:
    documents = objects(REPO / "docs/workflows/training-taint-rule.yaml")
    (rule,) = [o for o in documents if o["kind"] == "DeviceTaintRule"]
    templates = {o["metadata"]["namespace"]: o for o in documents if o["kind"] != "DeviceTaintRule"}
    taint = rule["spec"]["taint"]
    (training,) = templates["training"]["spec"]["spec"]["devices"]["requests"]
    (inference,) = templates["inference"]["spec"]["spec"]["devices"]["requests"]
    assert {**taint, "operator": "Equal"} in training["exactly"]["tolerations"]
    assert "tolerations" not in inference["exactly"]
    fleet = Fleet()
    for node in ("node-a", "node-b"):
        for obj in cluster.node_slices(node):
            fleet.apply("ResourceSlice", "ADDED", obj)
    fleet.apply("DeviceTaintRule", "ADDED", rule)
    fleet.refresh()
    free = {g.node: g.counts["free"] for g in fleet.report().groups}
    assert free == {"node-a": 0, "node-b": 8}


@pytest.mark.parametrize("path", ["docs/workflows/fair-sharing-quota.yaml"])
def test_quota_names_meet_real_classes_and_extended_resources(path: str) -> None:
    (quota,) = objects(REPO / path)
    known = {**BASE, **classes(EXTENDED)}
    extended = {c["spec"].get("extendedResourceName") for c in known.values()}
    for name in quota["spec"]["hard"]:
        if name.endswith(".deviceclass.resource.k8s.io/devices"):
            assert name.removesuffix(".deviceclass.resource.k8s.io/devices") in known, name
        else:
            assert name.removeprefix("requests.") in extended, name
