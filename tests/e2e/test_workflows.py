"""The operator workflows of docs/workflows/ on the real cluster: unmodified pods through
DRAExtendedResource, training kept apart from inference (a DeviceTaintRule, or a node pool with
DeviceClasses), and fair sharing with ResourceQuotas, refused with the messages the docs show."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.plugin import (
    REPO,
    PluginProcess,
    apply,
    apply_component,
    claim_template,
    container_cdi_devices,
    delete,
    delete_pods,
    device_request,
    ensure_namespace,
    get,
    pod,
    pod_claims,
    pod_events,
    pod_object,
    published_devices,
    scheduling_message,
    simulated_device_count,
    unidra,
    wait_pod_ready,
    wait_published,
    wait_seconds_for,
    wait_unprepared,
)

from driver.localcluster import LocalCluster
from support.waiting import wait_until

WORKFLOWS = REPO / "docs" / "workflows"
FAIR_SHARING = REPO / "docs" / "fair-sharing.md"
NAMESPACES = ("inference", "training", "team-a")
H100_WITH_MIG = ("dgx-h100", "--partitions")
WHOLE_DEVICE = '!device.attributes["unidra.dev"].partition'


class Node:
    """node-a's one kubelet plugin, started again with other flags when a test needs another node."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.process: PluginProcess | None = None
        self.flags: tuple[str, ...] = ()

    def run(self, profile: str, *flags: str) -> PluginProcess:
        if self.process is not None and self.flags == (profile, *flags):
            return self.process
        self.stop()
        self.process = PluginProcess(self.cluster, simulate=profile, args=flags).start()
        self.flags = (profile, *flags)
        wait_published(self.cluster, simulated_device_count(profile, "--partitions" in flags))
        return self.process

    def clean(self) -> None:
        """No pods left, and every claim unprepared: the next test has every device."""
        for namespace in NAMESPACES:
            delete_pods(self.cluster, namespace)
        if self.process is not None:
            wait_unprepared(self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.clean()
            self.process.stop()
            self.process = None


@pytest.fixture(scope="module")
def node(cluster: LocalCluster, installed: str) -> Iterator[Node]:
    for namespace in NAMESPACES:
        ensure_namespace(cluster, namespace)
    plugin = Node(cluster)
    try:
        yield plugin
    finally:
        plugin.stop()


@pytest.fixture(autouse=True)
def no_pods_left(node: Node) -> Iterator[None]:
    yield
    node.clean()


def _documents(path: Path) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all(path.read_text()) if o]


def _devices(claim: dict[str, Any]) -> list[str]:
    return [r["device"] for r in claim["status"]["allocation"]["devices"]["results"]]


def _fleet(cluster: LocalCluster) -> dict[str, Any]:
    return dict(
        json.loads(unidra("fleet", f"--kubeconfig={cluster.admin_kubeconfig}", "-o", "json"))
    )


# -- training apart from inference -------------------------------------------------------------


def test_a_reserved_node_takes_training_claims_and_never_inference(
    cluster: LocalCluster, node: Node
) -> None:
    node.run(*H100_WITH_MIG)
    manifests = _documents(WORKFLOWS / "training-taint-rule.yaml")
    (rule,) = [m for m in manifests if m["kind"] == "DeviceTaintRule"]
    assert rule["spec"]["deviceSelector"]["pool"] == cluster.node_name
    apply(cluster, *manifests)
    try:
        apply(cluster, pod("server", "inference", templates={"gpu": "one-gpu"}))
        assert "cannot allocate all claims" in scheduling_message(cluster, "inference", "server")
        # The fleet says why: the devices are reserved, not free.
        (group,) = [g for n in _fleet(cluster)["nodes"] for g in n["groups"]]
        assert (group["free"], group["tainted"]) == (0, 8)
        source = f"DeviceTaintRule/{rule['metadata']['name']}"
        assert {t["source"] for d in group["devices"] for t in d["taints"]} == {source}

        apply(cluster, pod("trainer", "training", templates={"gpus": "eight-gpus-one-fabric"}))
        wait_pod_ready(cluster, "training", "trainer")
        (claim,) = pod_claims(cluster, "training", "trainer")
        assert len(_devices(claim)) == 8
        delete(cluster, "pod", "trainer", "training")
        # Every GPU idle again, and still the inference pod does not get one.
        assert node.process is not None
        wait_unprepared(node.process)
        wait_seconds_for(lambda: _scheduled(cluster, "inference", "server"), seconds=3)
    finally:
        delete(cluster, "devicetaintrule", rule["metadata"]["name"])
    wait_pod_ready(cluster, "inference", "server")  # the rule was all that kept it away


def _scheduled(cluster: LocalCluster, namespace: str, name: str) -> bool:
    return bool((pod_object(cluster, namespace, name) or {}).get("spec", {}).get("nodeName"))


def test_a_training_node_pool_keeps_inference_pods_away_and_its_classes_split_the_devices(
    cluster: LocalCluster, node: Node
) -> None:
    node.run(*H100_WITH_MIG)
    manifests = _documents(WORKFLOWS / "training-node-pools.yaml")
    (trainer,) = [m for m in manifests if m["kind"] == "Pod"]
    ((key, value),) = trainer["spec"]["nodeSelector"].items()
    classes = [m["metadata"]["name"] for m in manifests if m["kind"] == "DeviceClass"]
    cluster.kubectl("label", "node", cluster.node_name, f"{key}={value}")
    cluster.kubectl("taint", "node", cluster.node_name, f"{key}={value}:NoSchedule")
    try:
        apply(cluster, *manifests)
        wait_pod_ready(cluster, "training", "trainer")
        (claim,) = pod_claims(cluster, "training", "trainer")
        gpus = _devices(claim)
        assert len(gpus) == 4 and not any("-mig-" in d for d in gpus)  # whole GPUs

        inference = {"devices": {"requests": [device_request(device_class="inference.unidra.dev")]}}
        whole = {
            "devices": {
                "requests": [
                    device_request(device_class="inference.unidra.dev", selectors=[WHOLE_DEVICE])
                ]
            }
        }
        apply(
            cluster,
            claim_template("a-slice", "inference", inference),
            claim_template("a-whole-gpu", "inference", whole),
        )
        apply(cluster, pod("server", "inference", templates={"gpu": "a-slice"}))
        assert "untolerated taint" in scheduling_message(cluster, "inference", "server")

        # Let inference onto the node: its class still gives it partitions only.
        admitted = [{"key": key, "operator": "Equal", "value": value, "effect": "NoSchedule"}]
        apply(
            cluster,
            pod("sliced", "inference", templates={"gpu": "a-slice"}, tolerations=admitted),
            pod("greedy", "inference", templates={"gpu": "a-whole-gpu"}, tolerations=admitted),
        )
        wait_pod_ready(cluster, "inference", "sliced")
        (slice_claim,) = pod_claims(cluster, "inference", "sliced")
        assert "-mig-" in _devices(slice_claim)[0]
        assert "cannot allocate all claims" in scheduling_message(cluster, "inference", "greedy")
    finally:
        cluster.kubectl("taint", "node", cluster.node_name, f"{key}={value}:NoSchedule-")
        cluster.kubectl("label", "node", cluster.node_name, f"{key}-")
        delete_pods(cluster, "training")
        for name in classes:
            delete(cluster, "deviceclass", name)


# -- fair sharing ------------------------------------------------------------------------------


def _refusal(done: Any) -> str:
    """The API server's message in kubectl's refusal of a create."""
    assert done.returncode != 0, "it was not refused"
    return str(done.stderr.strip().split('": ', 1)[1])


def _documented(message: str) -> bool:
    """Whether docs/fair-sharing.md shows the message (generated name suffixes aside)."""

    def plain(text: str) -> str:
        return re.sub(r'-[a-z0-9]{5}"', '-xxxxx"', text)

    return plain(message) in plain(FAIR_SHARING.read_text())


def _create(cluster: LocalCluster, obj: dict[str, Any]) -> Any:
    return cluster.kubectl("create", "-f", "-", input=json.dumps(obj), check=False)


def _claim(name: str, namespace: str, count: int) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"devices": {"requests": [device_request(count=count)]}},
    }


@pytest.fixture
def quota(cluster: LocalCluster, node: Node) -> Iterator[dict[str, Any]]:
    """docs/workflows/fair-sharing-quota.yaml applied, once the quota controller has counted."""
    (found,) = _documents(WORKFLOWS / "fair-sharing-quota.yaml")
    namespace, name = found["metadata"]["namespace"], found["metadata"]["name"]
    apply(cluster, found)

    def counted() -> bool:
        status = (get(cluster, f"/api/v1/namespaces/{namespace}/resourcequotas/{name}") or {}).get(
            "status", {}
        )
        return set(status.get("used", {})) == set(found["spec"]["hard"])

    wait_until(counted, timeout=30, what="the quota controller to count the namespace")
    try:
        yield found
    finally:
        cluster.kubectl("delete", "resourceclaims,resourcequotas", "--all", "-n", namespace)


def _over_quota(cluster: LocalCluster, namespace: str, pod_name: str, reason: str) -> str:
    """The first message of the pod's events with `reason` that says a quota was exceeded."""
    (event, *_) = wait_until(
        lambda: [
            m for m in pod_events(cluster, namespace, pod_name, reason) if "exceeded quota" in m
        ],
        timeout=30,
        what=f"a {reason} event of {pod_name} about the quota",
    )
    return str(event)


def _wait_counted(
    cluster: LocalCluster, namespace: str, name: str, resource: str, used: str, hard: str = "100"
) -> None:
    """A ResourceQuota of one line, once the quota controller has counted `used`."""
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"hard": {resource: hard}},
        },
    )
    path = f"/api/v1/namespaces/{namespace}/resourcequotas/{name}"
    wait_until(
        lambda: (get(cluster, path) or {}).get("status", {}).get("used", {}).get(resource) == used,
        timeout=30,
        what=f"{resource} counted as {used}",
    )


def test_a_claim_over_its_device_class_quota_is_refused_with_the_documented_message(
    cluster: LocalCluster, quota: dict[str, Any]
) -> None:
    namespace = quota["metadata"]["namespace"]
    assert _create(cluster, _claim("job-6", namespace, 6)).returncode == 0
    refused = _refusal(_create(cluster, _claim("job-4", namespace, 4)))
    assert "exceeded quota: accelerators" in refused
    assert _documented(refused), refused
    # Claims count under their class's implicit extended resource too.
    implicit = "requests.deviceclass.resource.kubernetes.io/gpu.unidra.dev"
    _wait_counted(cluster, namespace, "implicit", implicit, "6")
    # A pod's claim from a template is counted when the controller creates it: the pod waits.
    apply(
        cluster,
        claim_template(
            "four-gpus", namespace, {"devices": {"requests": [device_request(count=4)]}}
        ),
        pod("job-4", namespace, templates={"gpus": "four-gpus"}),
    )
    event = _over_quota(cluster, namespace, "job-4", "FailedResourceClaimCreation")
    assert _documented(event), event


def test_an_unmodified_pod_over_its_extended_resource_quota_is_refused_with_the_documented_message(
    cluster: LocalCluster, node: Node, quota: dict[str, Any], extended_classes: Path
) -> None:
    namespace = quota["metadata"]["namespace"]
    node.run(*H100_WITH_MIG)
    refused = _refusal(
        _create(cluster, pod("big-inference", namespace, limits={"unidra.dev/gpu": "9"}))
    )
    assert _documented(refused), refused
    # The claim the scheduler writes for a pod is counted under its class when it is written.
    _wait_counted(
        cluster,
        namespace,
        "extended-claims",
        "gpu.extended.unidra.dev.deviceclass.resource.k8s.io/devices",
        "0",
        hard="1",
    )
    assert (
        _create(cluster, pod("two-gpus", namespace, limits={"unidra.dev/gpu": "2"})).returncode == 0
    )
    event = _over_quota(cluster, namespace, "two-gpus", "FailedScheduling")
    assert _documented(event), event
    assert not _scheduled(cluster, namespace, "two-gpus")


# -- unmodified pods ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extended_classes(cluster: LocalCluster, installed: str) -> Iterator[Path]:
    """The extended-resources component: DeviceClasses for nvidia.com/gpu, amd.com/gpu, unidra.dev/gpu."""
    directory = apply_component(cluster, "extended-resources")
    try:
        yield directory
    finally:
        cluster.kubectl("delete", "-k", str(directory))


@pytest.mark.parametrize(
    ("resource", "flags", "vendor"),
    [
        ("nvidia.com/gpu", H100_WITH_MIG, "nvidia"),
        ("unidra.dev/gpu", H100_WITH_MIG, "nvidia"),
        ("amd.com/gpu", ("mi300x",), "amd"),
    ],
)
def test_an_unmodified_pod_gets_a_whole_unidra_gpu_through_its_extended_resource(
    cluster: LocalCluster,
    node: Node,
    extended_classes: Path,
    resource: str,
    flags: tuple[str, ...],
    vendor: str,
) -> None:
    plugin = node.run(*flags)
    (unchanged,) = _documents(WORKFLOWS / "unmodified-pod.yaml")
    unchanged["spec"]["containers"][0]["resources"]["limits"] = {resource: 1}
    name = unchanged["metadata"]["name"]
    apply(cluster, unchanged)
    ready = wait_pod_ready(cluster, "inference", name)
    status = ready["status"]["extendedResourceClaimStatus"]
    (mapping,) = status["requestMappings"]
    assert mapping["resourceName"] == resource
    claim = get(
        cluster,
        f"/apis/resource.k8s.io/v1/namespaces/inference/resourceclaims/{status['resourceClaimName']}",
    )
    assert claim is not None
    assert (
        claim["metadata"]["annotations"]["resource.kubernetes.io/extended-resource-claim"] == "true"
    )
    (device,) = _devices(claim)
    attributes = published_devices(cluster)[device]["attributes"]
    assert attributes["vendor"]["string"] == vendor and not attributes["partition"]["bool"]
    # kubelet asked Unidra to prepare it, and the runtime got Unidra's CDI device.
    prepared = plugin.checkpoint()[claim["metadata"]["uid"]]
    assert container_cdi_devices(cluster, "inference", name) == list(prepared.devices[0].cdi_ids)
    (held,) = [c for c in _fleet(cluster)["claims"] if c["name"] == claim["metadata"]["name"]]
    assert held["extendedResource"] and [p["name"] for p in held["pods"]] == [name]
    if vendor == "amd":
        apply(cluster, pod("wants-nvidia", "inference", limits={"nvidia.com/gpu": "1"}))
        assert "cannot allocate all claims" in scheduling_message(
            cluster, "inference", "wants-nvidia"
        )
        # The fleet view says what the unscheduled pod waits for, though it has no claim yet.
        (waiting,) = [p for p in _fleet(cluster)["pending"] if p["pod"] == "wants-nvidia"]
        assert waiting["claims"] == [] and waiting["extendedResources"] == [
            {
                "name": "nvidia.com/gpu",
                "deviceClassNames": ["nvidia-gpu.extended.unidra.dev"],
                "count": 1,
            }
        ]
