"""Slices from devices: splitting by the API's limits, the 1.35 partitionable layout, and validation errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from driver import inventory, sharing, slices, validation
from driver.backends import BackendContext
from driver.validation import SliceInvalid
from support.profiles import write_profile
from vendors.simulated import SimulatedBackend, profiles


def inventory_of(
    profile: str, partitions: bool = False, shared: bool = False
) -> inventory.Inventory:
    backend = SimulatedBackend(BackendContext(node_name="node-a", options={"profile": profile}))
    return inventory.discover(
        [backend], partitions=partitions, policy=sharing.parse_policy(shared, {})
    )


def objects(contents: list[slices.SliceContent]) -> list[dict]:
    return [
        slices.slice_object(
            c, driver="unidra.dev", node="node-a", node_uid="uid", generation=1, count=len(contents)
        )
        for c in contents
    ]


@pytest.mark.parametrize(
    ("count", "expected"), [(1, [1]), (128, [128]), (129, [128, 1]), (300, [128, 128, 44])]
)
def test_devices_are_split_at_128(tmp_path: Path, count: int, expected: list[int]) -> None:
    contents = slices.build(inventory_of(str(write_profile(tmp_path / "p.yaml", count))))
    assert [len(c.devices) for c in contents] == expected
    validation.check_pool(objects(contents))


def test_taints_lower_the_limit_to_64(tmp_path: Path) -> None:
    found = inventory_of(str(write_profile(tmp_path / "p.yaml", 130)))
    tainted = found.devices[3].name
    contents = slices.build(
        found,
        taints={
            tainted: [{"key": "unidra.dev/unhealthy", "value": "xid-79", "effect": "NoSchedule"}]
        },
    )
    assert [len(c.devices) for c in contents] == [
        64,
        66,
    ]  # only the slice holding the taint is limited
    validation.check_pool(objects(contents))


def test_an_empty_node_still_publishes_one_slice() -> None:
    empty = inventory.Inventory(by_name={}, backends={})
    assert slices.build(empty) == [slices.SliceContent()]


@pytest.mark.parametrize("profile", profiles.builtin_names())
@pytest.mark.parametrize("partitions", [False, True])
@pytest.mark.parametrize("shared", [False, True], ids=["exclusive", "sharing"])
def test_every_builtin_profile_is_valid(profile: str, partitions: bool, shared: bool) -> None:
    validation.check_pool(objects(slices.build(inventory_of(profile, partitions, shared))))


def test_shareable_whole_devices_keep_consuming_all_their_counters() -> None:
    """Partitions and shares never contradict each other: a shareable GPU still consumes every
    counter of its set (once, however many shares it has: checked on the real scheduler in
    tests/e2e/test_sharing.py), so no partition fits while it has shares, and the other way
    round. Partitions themselves are not shareable."""
    contents = slices.build(inventory_of("dgx-h100", partitions=True, shared=True))
    devices = {d["name"]: d for c in contents for d in c.devices}
    sets = {s["name"]: s["counters"] for c in contents for s in c.shared_counters}
    whole = devices["gpu-0000-1b-00-0"]
    assert whole["allowMultipleAllocations"] is True
    assert whole["consumesCounters"] == [
        {"counterSet": "gpu-0000-1b-00-0-counters", "counters": sets["gpu-0000-1b-00-0-counters"]}
    ]
    assert whole["attributes"]["sharing"] == {"string": "TimeSlicing"}
    assert whole["attributes"]["sharingLimits"] == {"string": "none"}
    mig = devices["gpu-0000-1b-00-0-mig-3g40gb-4"]
    assert "allowMultipleAllocations" not in mig and "sharing" not in mig["attributes"]
    assert all("requestPolicy" not in c for c in mig["capacity"].values())


def test_gpus_are_shared_npus_and_hpus_are_not() -> None:
    for profile, shared in (("mixed", {"gpu"}), ("gaudi3", set()), ("rngd", set())):
        found = inventory_of(profile, shared=True)
        kinds = {d.type.value for d in found.devices if d.name in found.shareable}
        assert kinds == shared, profile
    amd = inventory_of("mi300x", shared=True)
    entry = next(d for c in slices.build(amd) for d in c.devices)
    # CDNA GPUs hold a compute share through CU masks: compute units can be requested.
    assert entry["capacity"]["computeUnits"]["requestPolicy"]["validRange"] == {
        "min": "0",
        "max": "304",
        "step": "1",
    }
    assert entry["attributes"]["sharingLimits"] == {"string": "computeUnits"}


def test_dgx_h100_with_partitions_shares_counters_between_gpus_and_mig() -> None:
    contents = slices.build(inventory_of("dgx-h100", partitions=True))
    counter_slices = [c for c in contents if c.shared_counters]
    device_slices = [c for c in contents if c.devices]
    devices = [d for c in device_slices for d in c.devices]
    assert len(devices) >= 150
    assert all(not c.devices for c in counter_slices) and all(
        not c.shared_counters for c in device_slices
    )
    assert all(len(c.devices) <= 64 for c in device_slices)
    sets = {s["name"]: s["counters"] for c in counter_slices for s in c.shared_counters}
    assert len(sets) == 8
    full = next(d for d in devices if d["name"] == "gpu-0000-1b-00-0")
    mig = next(d for d in devices if d["name"] == "gpu-0000-1b-00-0-mig-3g40gb-4")
    assert full["consumesCounters"][0]["counterSet"] == "gpu-0000-1b-00-0-counters"
    assert full["consumesCounters"][0]["counters"] == sets["gpu-0000-1b-00-0-counters"]
    assert mig["consumesCounters"][0]["counterSet"] == "gpu-0000-1b-00-0-counters"
    used = mig["consumesCounters"][0]["counters"]
    assert {k for k in used if k.startswith("memory-slice")} == {
        f"memory-slice-{i}" for i in range(4, 8)
    }
    assert used["compute-units"] == {"value": "60"}


def test_mig_placements_that_overlap_cannot_both_fit() -> None:
    found = inventory_of("dgx-h100", partitions=True)
    parts = found.partitions
    counters = found.layouts["gpu-0000-1b-00-0"].counters

    def fits(*names: str) -> bool:
        total: dict[str, int] = {}
        for name in names:
            for counter, value in parts[name].consumes.items():
                total[counter] = total.get(counter, 0) + value
        return all(total[c] <= counters[c] for c in total)

    assert fits("gpu-0000-1b-00-0-mig-4g40gb-0", "gpu-0000-1b-00-0-mig-3g40gb-4")
    assert not fits("gpu-0000-1b-00-0-mig-4g40gb-0", "gpu-0000-1b-00-0-mig-2g20gb-2")
    assert fits(*[f"gpu-0000-1b-00-0-mig-1g10gb-{i}" for i in range(7)])
    assert not fits("gpu-0000-1b-00-0-mig-7g80gb-0", "gpu-0000-1b-00-0-mig-1g10gb-0")


def broken(mutate) -> list[dict]:  # type: ignore[no-untyped-def]
    items = objects(slices.build(inventory_of("dgx-h100", partitions=True, shared=True)))
    mutate(items)
    return items


def device(items: list[dict], slice_index: int = 1, index: int = 0) -> dict:
    return items[slice_index]["spec"]["devices"][index]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: device(s).update(name="GPU_0"),
            "device 'GPU_0': spec.devices[0].name: 'GPU_0' must be a DNS label",
        ),
        (
            lambda s: device(s)["attributes"].update(model={"string": "x" * 65}),
            "spec.devices[0].attributes['model'].string: 65 characters; at most 64",
        ),
        (
            lambda s: device(s)["attributes"].update(driverVersion={"version": "570.86"}),
            "attributes['driverVersion'].version: '570.86' is not semver 2.0.0",
        ),
        (
            lambda s: device(s)["attributes"].update({"bad-name": {"string": "x"}}),
            "attributes['bad-name']: 'bad-name' must be a C identifier",
        ),
        (
            lambda s: device(s)["attributes"].update({f"extra{i}": {"int": i} for i in range(6)}),
            "attributes and 2 capacities; at most 32 together",
        ),
        (
            lambda s: device(s)["attributes"].update(index={"int": 1, "string": "1"}),
            "exactly one of bool, int, string or version",
        ),
        (
            lambda s: device(s)["capacity"].update(memory={"value": "lots"}),
            "capacity['memory'].value: 'lots' is not a quantity",
        ),
        (
            lambda s: device(s).update(taints=[{"key": "unidra.dev/unhealthy", "effect": "Evict"}]),
            "taints[0].effect: 'Evict' must be one of NoSchedule, NoExecute, None",
        ),
        (
            lambda s: s[1]["spec"].update(sharedCounters=s[0]["spec"]["sharedCounters"]),
            "only one of spec.sharedCounters or spec.devices",
        ),
        (
            lambda s: s[1]["spec"]["devices"].extend(copy.deepcopy(s[2]["spec"]["devices"][:1])),
            "at most 64 are allowed when devices have taints or consume counters",
        ),
        (
            lambda s: device(s)["consumesCounters"][0].update(
                counterSet="gpu-0000-ff-00-0-counters"
            ),
            "counter set 'gpu-0000-ff-00-0-counters' does not exist in the pool",
        ),
        (
            lambda s: s[2]["spec"]["devices"].__setitem__(0, copy.deepcopy(device(s))),
            "device 'gpu-0000-1b-00-0' appears twice",
        ),
        (
            lambda s: s[0]["spec"]["pool"].update(resourceSliceCount=0),
            "spec.pool.resourceSliceCount must be greater than zero",
        ),
        # Consumable capacity (KEP-5075), as the 1.36 API server checks it.
        (
            lambda s: device(s).pop("allowMultipleAllocations"),
            "capacity['memory'].requestPolicy: allowMultipleAllocations must be true",
        ),
        (
            lambda s: device(s)["capacity"]["computeUnits"]["requestPolicy"].update(default="1"),
            "requestPolicy.validValues: must contain the default",
        ),
        (
            lambda s: device(s)["capacity"]["memory"]["requestPolicy"].update(default="1Ti"),
            "requestPolicy.default: 1Ti is more than the capacity",
        ),
        (
            lambda s: device(s)["capacity"]["memory"]["requestPolicy"]["validRange"].pop("min"),
            "requestPolicy.validRange.min: is required",
        ),
        (
            lambda s: device(s)["capacity"]["memory"]["requestPolicy"].update(validValues=["1Gi"]),
            "only one of validValues and validRange may be set",
        ),
    ],
)
def test_validation_names_the_device_and_field(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SliceInvalid) as caught:
        validation.check_pool(broken(mutate))
    assert any(message in problem for problem in caught.value.problems), caught.value.problems
