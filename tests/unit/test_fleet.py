"""The fleet view's figures: device states, largestFreeGroup after scripted allocations and taints,
partitions through shared counters, fragmentation, holders, pending pods, orphans, and incremental
recomputation giving exactly what a fresh computation gives."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from driver.fleet import render as fleet_render
from driver.fleet.view import Fleet, Group, Report, fragmentation
from support import cluster

NAMES = cluster.device_names()  # the 8 GPUs of a dgx-h100, in PCI order
H100 = "NVIDIA H100 80GB HBM3"


def fleet_of(*objects: tuple[str, dict[str, Any]]) -> Fleet:
    fleet = Fleet()
    for kind, obj in objects:
        fleet.apply(kind, "ADDED", obj)  # type: ignore[arg-type]
    fleet.refresh()
    return fleet


def two_nodes(**taints: list[dict[str, str]]) -> Fleet:
    """node-a and node-b, 8 H100s each in two NVLink domains of 4."""
    fleet = Fleet()
    for node in ("node-a", "node-b"):
        for obj in cluster.node_slices(
            node, domains=2, taints=taints if node == "node-a" else None
        ):
            fleet.apply("ResourceSlice", "ADDED", obj)
    return fleet


def report(fleet: Fleet) -> Report:
    fleet.refresh()
    return fleet.report()


def largest(fleet: Fleet) -> list[tuple[str, int, int]]:
    """(node, free, largestFreeGroup) of every group, in node and domain order."""
    return [(g.node, g.counts["free"], g.largest_free_group) for g in report(fleet).groups]


def model(fleet: Fleet) -> tuple[int, int]:
    (summary,) = report(fleet).models
    return summary.counts["free"], summary.largest_free_group


def allocate(fleet: Fleet, name: str, node: str, *indices: int, pods: tuple[str, ...] = ()) -> None:
    devices = [(node, NAMES[i]) for i in indices]
    fleet.apply("ResourceClaim", "ADDED", cluster.claim(name, devices, pods=list(pods)))


def test_a_scripted_series_of_allocations_moves_the_largest_free_group() -> None:
    fleet = two_nodes()
    assert largest(fleet) == [
        ("node-a", 4, 4),
        ("node-a", 4, 4),
        ("node-b", 4, 4),
        ("node-b", 4, 4),
    ]
    assert model(fleet) == (16, 4)
    allocate(fleet, "a1", "node-a", 0)  # one GPU of node-a's first domain
    assert largest(fleet)[0] == ("node-a", 3, 3) and model(fleet) == (15, 4)
    allocate(fleet, "a2", "node-a", 4, 5)  # two of its second domain
    allocate(fleet, "b1", "node-b", 0, 1)
    allocate(fleet, "b2", "node-b", 6)
    assert largest(fleet) == [
        ("node-a", 3, 3),
        ("node-a", 2, 2),
        ("node-b", 2, 2),
        ("node-b", 3, 3),
    ]
    # 10 GPUs free, but no domain has 4 of them: the seed's pending 4-GPU job.
    assert model(fleet) == (10, 3)
    (summary,) = report(fleet).models
    assert [(f.job_size, f.stranded) for f in summary.fragmentation] == [(2, 2), (4, 10), (8, 10)]
    assert summary.fragmentation[1].ratio == 1.0
    fleet.apply("ResourceClaim", "DELETED", cluster.claim("a2"))
    assert largest(fleet)[1] == ("node-a", 4, 4) and model(fleet) == (12, 4)


def test_a_tainted_device_is_not_free_and_shrinks_the_largest_group() -> None:
    fleet = two_nodes(**{NAMES[2]: cluster.unhealthy("xid-79")})
    assert largest(fleet)[0] == ("node-a", 3, 3)
    device = next(d for d in report(fleet).groups[0].devices if d.name == NAMES[2])
    assert device.state == "tainted"
    assert [t.text for t in device.taints] == ["unidra.dev/unhealthy=xid-79:NoSchedule"]
    # The driver republishes the slice without the taint once the GPU recovers.
    for obj in cluster.node_slices("node-a", domains=2):
        fleet.apply("ResourceSlice", "MODIFIED", obj)
    assert largest(fleet)[0] == ("node-a", 4, 4)


def test_an_admins_taint_rule_takes_devices_out_and_back() -> None:
    fleet = two_nodes()
    rule = cluster.taint_rule("training", key="example.com/training", pool="node-b")
    fleet.apply("DeviceTaintRule", "ADDED", rule)
    assert largest(fleet) == [
        ("node-a", 4, 4),
        ("node-a", 4, 4),
        ("node-b", 0, 0),
        ("node-b", 0, 0),
    ]
    group = report(fleet).groups[2]
    assert group.counts["tainted"] == 4
    assert {t.source for d in group.devices for t in d.taints} == {"DeviceTaintRule/training"}
    one = cluster.taint_rule("one", key="example.com/broken", pool="node-a", device=NAMES[7])
    fleet.apply("DeviceTaintRule", "ADDED", one)
    assert largest(fleet)[1] == ("node-a", 3, 3)
    fleet.apply("DeviceTaintRule", "DELETED", rule)
    assert largest(fleet)[2:] == [("node-b", 4, 4), ("node-b", 4, 4)]


def test_a_rule_without_a_selector_or_with_one_the_view_cannot_evaluate_takes_nothing_out() -> None:
    fleet = two_nodes()
    everything = cluster.taint_rule("everything", key="example.com/all", driver="")
    assert everything["spec"]["deviceSelector"] == {}  # the empty selector matches every device
    none = cluster.taint_rule("none", key="example.com/none")
    del none["spec"]["deviceSelector"]  # no selector: no device, as Kubernetes reads it
    by_class = cluster.taint_rule("by-class", key="example.com/class")
    by_class["spec"]["deviceSelector"] = {"deviceClassName": "gpu.unidra.dev"}  # v1alpha3
    for rule in (none, by_class):
        fleet.apply("DeviceTaintRule", "ADDED", rule)
    assert [free for _, free, _ in largest(fleet)] == [4, 4, 4, 4]
    fleet.apply("DeviceTaintRule", "ADDED", everything)
    assert [free for _, free, _ in largest(fleet)] == [0, 0, 0, 0]


def test_effect_none_is_informational_but_the_drivers_health_taint_never_is() -> None:
    fleet = two_nodes(
        **{
            NAMES[0]: [{"key": "example.com/note", "value": "x", "effect": "None"}],
            NAMES[1]: cluster.unhealthy("overheating", effect="None"),
        }
    )
    states = {d.name: d.state for d in report(fleet).groups[0].devices}
    assert states[NAMES[0]] == "free" and states[NAMES[1]] == "tainted"


def test_a_tainted_device_that_is_in_use_shows_its_holder() -> None:
    fleet = two_nodes(**{NAMES[0]: cluster.unhealthy("ecc-uncorrectable", effect="NoExecute")})
    allocate(fleet, "train", "node-a", 0, 1, pods=("train-0",))
    fleet.apply("Pod", "ADDED", cluster.pod("train-0", ["train"], node="node-a"))
    found = report(fleet)
    device = next(d for d in found.groups[0].devices if d.name == NAMES[0])
    assert device.state == "allocated" and device.taints
    assert [(h.namespace, h.claim) for h in device.holders] == [("default", "train")]
    (claim,) = found.claims
    assert [(p.name, p.phase, p.node) for p in claim.pods] == [("train-0", "Running", "node-a")]
    assert [d.device for d in claim.devices] == NAMES[:2]
    assert "default/train" in fleet_render.render(found, "table")


def test_partitions_in_use_make_their_device_not_free_through_the_counters() -> None:
    fleet = Fleet()
    for obj in cluster.node_slices("node-a", partitions=True):
        fleet.apply("ResourceSlice", "ADDED", obj)
    parts = [n for n in cluster.device_names(partitions=True) if "-mig-" in n]
    first_gpu = [p for p in parts if p.startswith(NAMES[0] + "-")]
    fleet.apply(
        "ResourceClaim",
        "ADDED",
        cluster.claim("small", [("node-a", first_gpu[0]), ("node-a", first_gpu[1])]),
    )
    (group,) = report(fleet).groups
    assert group.total == 8  # partitions are not devices of their own in the counts
    assert group.counts["partitioned"] == 1 and group.counts["free"] == 7
    assert group.partitions_in_use == 2
    device = next(d for d in group.devices if d.name == NAMES[0])
    assert {h.device for h in device.holders} == set(first_gpu[:2])
    # A whole GPU allocated: allocated, not partitioned.
    fleet.apply("ResourceClaim", "ADDED", cluster.claim("whole", [("node-a", NAMES[1])]))
    (group,) = report(fleet).groups
    assert (group.counts["allocated"], group.counts["partitioned"], group.largest_free_group) == (
        1,
        1,
        6,
    )
    # The other way round: no partition of the allocated GPU is free, nor, on the partitioned
    # one, the slots its two 1g.10gb partitions use and the 7g.80gb that overlaps them.
    slots = sum(1 for p in parts if p.startswith(NAMES[2] + "-mig-1g10gb-"))
    assert group.free_partitions["1g.10gb"] == 6 * slots + slots - 2
    assert group.free_partitions["7g.80gb"] == 6


def test_admin_access_does_not_take_a_device() -> None:
    fleet = two_nodes()
    claim = cluster.claim("monitor", [("node-a", NAMES[0])])
    claim["status"]["allocation"]["devices"]["results"][0]["adminAccess"] = True
    fleet.apply("ResourceClaim", "ADDED", claim)
    device = report(fleet).groups[0].devices[0]
    assert device.state == "free" and device.holders[0].admin


def test_a_pool_being_republished_is_unavailable_and_old_generations_are_ignored() -> None:
    fleet = Fleet()
    (obj,) = cluster.node_slices("node-a")
    fleet.apply("ResourceSlice", "ADDED", obj)
    newer = json.loads(json.dumps(obj))
    newer["metadata"]["name"] = "node-a-next"
    newer["spec"]["pool"].update(generation=2, resourceSliceCount=2)
    newer["spec"]["devices"] = newer["spec"]["devices"][:4]
    fleet.apply("ResourceSlice", "ADDED", newer)
    found = report(fleet)
    (group,) = found.groups
    assert group.total == 4 and group.counts["unavailable"] == 4 and group.largest_free_group == 0
    assert found.incomplete_pools == (("unidra.dev", "node-a"),)
    assert "incomplete" in fleet_render.render(found, "table")


def test_a_node_that_takes_no_new_pods_has_no_free_devices() -> None:
    fleet = two_nodes()
    allocate(fleet, "running", "node-a", 0)
    fleet.apply("Node", "ADDED", cluster.node("node-a", unschedulable=True))  # kubectl cordon
    fleet.apply("Node", "ADDED", cluster.node("node-b", ready="Unknown"))  # kubelet stopped posting
    found = report(fleet)
    assert [(g.node, g.counts["allocated"], g.counts["unavailable"]) for g in found.groups] == [
        ("node-a", 1, 3),
        ("node-a", 0, 4),
        ("node-b", 0, 4),
        ("node-b", 0, 4),
    ]
    assert model(fleet) == (0, 0)
    assert found.unschedulable_nodes == (("node-a", "cordoned"), ("node-b", "unreachable"))
    table = fleet_render.render(found, "table")
    assert "note: node node-a is cordoned and takes no new pods" in table
    nodes = fleet_render.document(found)["nodes"]
    assert [(n["node"], n["unschedulable"]) for n in nodes] == [
        ("node-a", "cordoned"),
        ("node-b", "unreachable"),
    ]
    fleet.apply("Node", "MODIFIED", cluster.node("node-a"))  # kubectl uncordon
    fleet.apply("Node", "MODIFIED", cluster.node("node-b", ready="False"))
    assert largest(fleet) == [
        ("node-a", 3, 3),
        ("node-a", 4, 4),
        ("node-b", 0, 0),
        ("node-b", 0, 0),
    ]
    assert report(fleet).unschedulable_nodes == (("node-b", "not ready"),)
    assert "unschedulable" not in fleet_render.document(report(fleet))["nodes"][0]


def test_node_taints_and_status_updates_change_nothing() -> None:
    fleet = two_nodes()
    fleet.refresh()
    gpu_node = cluster.node("node-a")
    # GPU nodes are often tainted so that only GPU pods land there: their devices are still free.
    gpu_node["spec"]["taints"] = [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
    fleet.apply("Node", "ADDED", gpu_node)
    fleet.apply("Node", "MODIFIED", gpu_node)  # a heartbeat
    assert fleet.refresh() == 0 and fleet.nodes == {}
    assert model(fleet) == (16, 4)


def test_other_drivers_devices_are_counted_apart() -> None:
    foreign = {
        "metadata": {"name": "gpu-example"},
        "spec": {
            "driver": "gpu.example.com",
            "nodeName": "node-c",
            "pool": {"name": "node-c", "generation": 0, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0", "attributes": {"index": {"int": 0}}}],
        },
    }
    found = report(fleet_of(("ResourceSlice", foreign)))
    assert found.groups == () and found.ignored == (("gpu.example.com", 1),)


def test_an_allocation_to_a_device_no_slice_publishes_is_an_orphan() -> None:
    fleet = two_nodes()
    allocate(fleet, "stuck", "node-b", 3)
    for obj in cluster.node_slices("node-b", domains=2):
        fleet.apply("ResourceSlice", "DELETED", obj)  # node-b drained: kubelet wiped its slices
    found = report(fleet)
    assert [(o.claim, o.pool, o.device) for o in found.orphans] == [("stuck", "node-b", NAMES[3])]
    assert {g.node for g in found.groups} == {"node-a"}


def test_pending_pods_show_what_their_claims_ask_for() -> None:
    fleet = two_nodes()
    fleet.apply("ResourceClaim", "ADDED", cluster.claim("big", count=8))
    fleet.apply("Pod", "ADDED", cluster.pod("big-0", ["big"], phase="Pending"))
    fleet.apply("Pod", "ADDED", cluster.pod("other", [], phase="Pending"))
    (pending,) = report(fleet).pending
    (name, (request,)) = pending.claims[0]
    assert (pending.pod, name, request.device_classes, request.count) == (
        "big-0",
        "big",
        ("gpu.unidra.dev",),
        8,
    )


def device_class(name: str, extended_resource_name: str = "") -> dict[str, Any]:
    spec = {"extendedResourceName": extended_resource_name} if extended_resource_name else {}
    return {"kind": "DeviceClass", "metadata": {"name": name}, "spec": spec}


def unmodified_pod(name: str, node: str = "", **containers: dict[str, Any]) -> dict[str, Any]:
    """A pod written for device plugins: extended resources in its containers, no claims."""
    made = cluster.pod(name, [], node=node, phase="Pending")
    made["spec"]["resourceClaims"] = []
    made["spec"]["containers"] = [
        {"name": c, "image": "lab.local/pause:1", "resources": r} for c, r in containers.items()
    ]
    return made


def test_an_unscheduled_pod_asking_for_an_extended_resource_shows_the_classes_that_serve_it() -> (
    None
):
    fleet = two_nodes()
    fleet.apply("DeviceClass", "ADDED", device_class("nvidia-gpu.extended", "nvidia.com/gpu"))
    fleet.apply("DeviceClass", "ADDED", device_class("gpu.unidra.dev"))
    waiting = unmodified_pod(
        "trainer",
        # Containers add up; a limit alone is the request; cpu and memory are not extended.
        main={"limits": {"nvidia.com/gpu": "8", "cpu": "4"}},
        sidecar={"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 2}},
        implicit={"limits": {"deviceclass.resource.kubernetes.io/gpu.unidra.dev": "1"}},
    )
    waiting["spec"]["initContainers"] = [
        {
            "name": "warm",
            "resources": {"limits": {"deviceclass.resource.kubernetes.io/gpu.unidra.dev": "3"}},
        }
    ]
    fleet.apply("Pod", "ADDED", waiting)
    # Served by a device plugin, not DRA: no class names it, so the fleet view does not list it.
    fleet.apply(
        "Pod", "ADDED", unmodified_pod("plugin", main={"limits": {"example.com/fpga": "1"}})
    )
    # Scheduled: not pending, and without claims not even kept.
    fleet.apply(
        "Pod", "ADDED", unmodified_pod("bound", "node-a", main={"limits": {"nvidia.com/gpu": "1"}})
    )
    assert set(fleet.pods) == {("default", "trainer"), ("default", "plugin")}
    (pending,) = report(fleet).pending
    assert pending.pod == "trainer" and pending.claims == ()
    assert [(r.name, r.device_classes, r.count) for r in pending.extended] == [
        ("deviceclass.resource.kubernetes.io/gpu.unidra.dev", ("gpu.unidra.dev",), 3),
        ("nvidia.com/gpu", ("nvidia-gpu.extended",), 10),
    ]
    document = fleet_render.document(report(fleet))
    assert document["pending"][0]["extendedResources"][1] == {
        "name": "nvidia.com/gpu",
        "deviceClassNames": ["nvidia-gpu.extended"],
        "count": 10,
    }
    rows = [line.split() for line in fleet_render.tables(report(fleet)).splitlines()]
    assert ["default", "trainer", "(nvidia.com/gpu)", "10", "x", "nvidia-gpu.extended"] in rows
    # Once the scheduler binds it, it waits for nothing.
    fleet.apply("Pod", "MODIFIED", {**waiting, "spec": {**waiting["spec"], "nodeName": "node-a"}})
    assert report(fleet).pending == () and set(fleet.pods) == {("default", "plugin")}


def test_the_fragmentation_figure_is_the_share_of_free_devices_no_job_can_use() -> None:
    assert fragmentation([3, 3, 3, 3], 4).stranded == 12
    assert fragmentation([3, 3, 3, 3], 4).ratio == 1.0
    assert fragmentation([4, 3, 1], 4).stranded == 4
    assert fragmentation([4, 3, 1], 2).stranded == 2
    assert fragmentation([], 4).ratio == 0.0
    assert fragmentation([5], 1).stranded == 0


def test_the_document_names_largest_free_group_per_node_model_and_domain() -> None:
    fleet = two_nodes()
    allocate(fleet, "a1", "node-a", 0)
    doc = fleet_render.document(report(fleet))
    assert doc["kind"] == "FleetReport"
    assert doc["models"][0]["largestFreeGroup"] == 4
    node_a = doc["nodes"][0]
    assert node_a["node"] == "node-a"
    assert [(g["model"], g["largestFreeGroup"]) for g in node_a["groups"]] == [(H100, 3), (H100, 4)]
    assert node_a["groups"][0]["devices"][0]["holders"][0]["claim"] == "a1"
    assert {d["largestFreeGroup"] for d in doc["domains"]} == {3, 4}
    assert fleet_render.render(report(fleet), "yaml").startswith("apiVersion: unidra.dev/v1alpha1")


def test_an_unchanged_relist_recomputes_nothing() -> None:
    fleet = two_nodes()
    fleet.refresh()
    objects = cluster.node_slices("node-a", domains=2) + cluster.node_slices("node-b", domains=2)
    fleet.replace("ResourceSlice", objects)
    assert fleet.refresh() == 0
    fleet.replace(
        "ResourceSlice", objects[:1]
    )  # node-b's slice went away while we were not looking
    assert fleet.refresh() == 1 and {g.node for g in fleet.groups()} == {"node-a"}


# -- incremental recomputation equals a fresh one -----------------------------------------------

NODES = ("n1", "n2")
SLICES = {n: cluster.node_slices(n, domains=2)[0] for n in NODES}
Event = tuple[str, str, int, int]  # (kind, node, device index, variant)
events = st.lists(
    st.tuples(
        st.sampled_from(
            ["slice", "unslice", "claim", "unclaim", "rule", "unrule", "taint", "cordon", "node"]
        ),
        st.sampled_from(NODES),
        st.integers(0, 7),
        st.integers(0, 1),
    ),
    max_size=20,
)


World = dict[str, dict[str, dict[str, Any]]]  # kind -> name -> object: what the API server holds


def _play(fleet: Fleet, world: World, event: Event) -> None:
    """Apply one event to the fleet as a watch delivers it, and to the world it describes."""
    action, node, index, variant = event
    if action in ("slice", "taint", "unslice"):
        kind, obj = "ResourceSlice", json.loads(json.dumps(SLICES[node]))
        if action == "taint":
            obj["spec"]["devices"][index]["taints"] = cluster.unhealthy()
    elif action in ("cordon", "node"):
        kind, obj = "Node", cluster.node(node, unschedulable=action == "cordon")
    elif action in ("claim", "unclaim"):
        devices = [(node, NAMES[i % 8]) for i in range(index, index + variant + 1)]
        kind, obj = "ResourceClaim", cluster.claim(f"c{node}{variant}", devices)
    else:
        kind = "DeviceTaintRule"
        obj = cluster.taint_rule(f"r{variant}", key="k", pool=node, device=NAMES[index])
    name = obj["metadata"]["name"]
    if action.startswith("un"):
        fleet.apply(kind, "DELETED", obj)  # type: ignore[arg-type]
        world.setdefault(kind, {}).pop(name, None)
    else:
        fleet.apply(kind, "MODIFIED" if name in world.get(kind, {}) else "ADDED", obj)  # type: ignore[arg-type]
        world.setdefault(kind, {})[name] = obj
    fleet.refresh()


def _view(fleet: Fleet) -> list[Group]:
    fleet.refresh()
    return sorted(fleet.groups(), key=lambda g: (g.node, g.domain))


@settings(max_examples=150, deadline=None)
@given(events)
def test_incremental_recomputation_matches_a_fresh_one(played: list[Event]) -> None:
    incremental: Fleet = Fleet()
    world: World = {}
    for event in [*(("slice", node, 0, 0) for node in NODES), *played]:
        _play(incremental, world, event)
    fresh = Fleet()
    for kind, objects in world.items():
        fresh.replace(kind, objects.values())  # type: ignore[arg-type]
    assert _view(incremental) == _view(fresh)
    assert incremental.report().claims == fresh.report().claims
