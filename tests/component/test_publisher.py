"""Publishing ResourceSlices against a real HTTP API server.

Covers: first publish (owner reference, pool fields, the same slices `unidra inspect --slices`
prints), zero writes at steady state, restore after external delete, edit and kubelet's wipe,
recovery after an API outage, hot-plug with the generation bump of a re-layout, in-place
updates, and an API server that drops fields (feature gate off) without update loops.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from driver import inspect, kubeapi, slices
from driver.backends import BackendContext
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.inventory import LiveInventory
from driver.publisher import Publisher, TokenBucket
from driver.supervisor import Supervisor
from support.profiles import write_profile
from support.waiting import wait_until
from vendors.simulated import SimulatedBackend

NODE = "node-a"


class Harness:
    def __init__(
        self,
        api: FakeApiServer,
        profile: str,
        partitions: bool = False,
        limit: TokenBucket | None = None,
    ) -> None:
        self.api = api
        self.backend = SimulatedBackend(
            BackendContext(node_name=NODE, options={"profile": profile})
        )
        self.live = LiveInventory([self.backend], partitions=partitions)
        client = kubeapi.build_client(
            api.write_kubeconfig(Path(os.environ["UNIDRA_TEST_TMP"]) / "kubeconfig")
        )
        self.publisher = Publisher(
            api=kubeapi.SliceApi(client),
            driver="unidra.dev",
            node=NODE,
            desired=lambda: slices.build(self.live.current()),
            limit=limit or TokenBucket(),
        )
        self.supervisor = Supervisor()

    def start(self, wait: bool = True) -> Harness:
        self.supervisor.spawn(
            "slice-publisher", self.publisher.reconcile_loop, interrupt=self.publisher.wake
        )
        self.supervisor.spawn(
            "slice-watch", self.publisher.watch_loop, interrupt=self.publisher.interrupt_watch
        )
        if wait:
            wait_until(self.in_sync, what="first publish")
        return self

    def stop(self) -> None:
        self.supervisor.stop()

    def published(self) -> list[dict]:
        return [
            s
            for s in self.api.list("resource.k8s.io", "resourceslices")
            if s["spec"]["nodeName"] == NODE
        ]

    def in_sync(self) -> bool:
        """The API holds exactly the desired slices, as one complete pool generation."""
        published = self.published()
        desired = slices.build(self.live.current())
        if not published or len(published) != len(desired):
            return False
        generations = {s["spec"]["pool"]["generation"] for s in published}
        counts = {s["spec"]["pool"]["resourceSliceCount"] for s in published}
        wanted = sorted(json.dumps(c.spec_fields(), sort_keys=True) for c in desired)
        have = sorted(
            json.dumps(
                {k: v for k, v in s["spec"].items() if k in ("devices", "sharedCounters")},
                sort_keys=True,
            )
            for s in published
        )
        return len(generations) == 1 and counts == {len(desired)} and wanted == have

    def reconcile(self) -> None:
        """Wake the publisher and wait for a reconciliation that started after the wake."""
        for _ in range(2):  # the first may be satisfied by a sync that was already running
            syncs = self.publisher.stats.syncs
            self.publisher.wake()
            wait_until(lambda s=syncs: self.publisher.stats.syncs > s, what="a reconciliation")

    def settle(self) -> int:
        """Let in-flight work finish, then count the writes of two more reconciliations."""
        self.reconcile()
        before = len(self.api.writes())
        self.reconcile()
        self.reconcile()
        return len(self.api.writes()) - before


@pytest.fixture
def harness(api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:  # type: ignore[type-arg]
    monkeypatch.setenv("UNIDRA_TEST_TMP", str(tmp_path))
    started: list[Harness] = []

    def make(
        profile: str = "dgx-h100",
        partitions: bool = False,
        wait: bool = True,
        limit: TokenBucket | None = None,
    ) -> Harness:
        h = Harness(api, profile, partitions, limit).start(wait)
        started.append(h)
        return h

    yield make
    for h in started:
        h.stop()


def test_first_publish_owned_by_the_node_and_equal_to_inspect(harness, api: FakeApiServer) -> None:
    h = harness("dgx-h100", partitions=True)
    published = h.published()
    node_uid = api.get("", "nodes", NODE)["metadata"]["uid"]
    assert len(published) == 5
    for item in published:
        assert item["metadata"]["name"].startswith("node-a-unidra.dev-")
        assert item["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": node_uid, "controller": True}
        ]
        assert item["spec"]["pool"] == {"name": NODE, "generation": 1, "resourceSliceCount": 5}
        assert item["spec"]["driver"] == "unidra.dev" and item["spec"]["nodeName"] == NODE
    printed = json.loads(
        inspect.slices_document(h.live.current(), driver="unidra.dev", node=NODE, output="json")
    )
    assert sorted(json.dumps(i["spec"], sort_keys=True) for i in printed["items"]) == sorted(
        json.dumps(i["spec"], sort_keys=True) for i in published
    )


def test_steady_state_makes_no_writes(harness, api: FakeApiServer) -> None:
    h = harness("mixed")
    assert h.settle() == 0
    assert h.publisher.stats.writes == 1


def test_external_delete_and_edit_are_restored(harness, api: FakeApiServer) -> None:
    h = harness("dgx-h100", partitions=True)
    victim = h.published()[2]
    api.delete("resource.k8s.io", "resourceslices", victim["metadata"]["name"])
    wait_until(h.in_sync, what="the deleted slice to come back")

    edited = copy.deepcopy(next(s for s in h.published() if s["spec"].get("devices")))
    edited["spec"]["devices"][0]["attributes"]["model"] = {"string": "tampered"}
    api.update("resource.k8s.io", "resourceslices", edited)
    wait_until(h.in_sync, what="the edited slice to be reverted")


def test_kubelet_wipe_of_all_node_slices_is_restored(harness, api: FakeApiServer) -> None:
    h = harness("mixed")
    http = urllib3.PoolManager()
    response = http.request(
        "DELETE",
        f"{api.url}/apis/resource.k8s.io/v1/resourceslices?fieldSelector=spec.nodeName%3D{NODE}",
    )
    assert response.status == 200
    started = time.monotonic()
    wait_until(h.in_sync, what="the wiped slices to come back")
    assert time.monotonic() - started < 5
    assert {s["spec"]["pool"]["generation"] for s in h.published()} == {
        2
    }  # never reuses a generation


def test_recovers_after_an_api_outage(harness, api: FakeApiServer, tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "node.yaml", 4)
    h = harness(str(profile))
    with api.outage():
        write_profile(profile, 5)  # a device is hot-plugged while the API server is gone
        os.utime(profile, (time.time() + 5, time.time() + 5))
        h.live.refresh()
        h.publisher.wake()
        wait_until(lambda: h.publisher.stats.errors > 0, what="publish attempts to fail")
    wait_until(h.in_sync, what="slices to be published after the outage")
    assert sum(len(s["spec"]["devices"]) for s in h.published()) == 5


def test_hot_plug_relayout_bumps_the_generation_of_every_slice(
    harness, api: FakeApiServer, tmp_path: Path
) -> None:
    profile = write_profile(tmp_path / "node.yaml", 128)
    h = harness(str(profile))
    assert [s["spec"]["pool"]["generation"] for s in h.published()] == [1]
    write_profile(profile, 129)
    os.utime(profile, (time.time() + 5, time.time() + 5))
    added, _, _ = h.live.refresh()
    assert added == ["gpu-0000-05-00-0"]
    h.publisher.wake()
    wait_until(h.in_sync, what="the re-layout")
    assert sorted(s["spec"]["pool"]["generation"] for s in h.published()) == [2, 2]
    assert all(s["spec"]["pool"]["resourceSliceCount"] == 2 for s in h.published())


def test_a_change_inside_one_slice_is_an_in_place_update(
    harness, api: FakeApiServer, tmp_path: Path
) -> None:
    profile = write_profile(tmp_path / "node.yaml", 3)
    h = harness(str(profile))
    before = len(api.requests)
    text = profile.read_text().replace("numaNode: 0}", "numaNode: 1}", 1)
    profile.write_text(text)
    os.utime(profile, (time.time() + 5, time.time() + 5))
    assert h.live.refresh()[2] == ["gpu-0000-01-00-0"]
    h.publisher.wake()
    wait_until(h.in_sync, what="the update")
    writes = api.writes(before)
    assert [w.method for w in writes] == ["PUT"]
    assert h.published()[0]["spec"]["pool"]["generation"] == 1


def test_fields_dropped_by_the_server_do_not_cause_update_loops(
    api: FakeApiServer, harness, caplog
) -> None:
    caplog.set_level(logging.ERROR)

    def gate_off(plural: str, obj: dict) -> None:
        if plural == "resourceslices":
            obj["spec"].pop("sharedCounters", None)
            for device in obj["spec"].get("devices") or []:
                device.pop("consumesCounters", None)

    api.storage_hooks.append(gate_off)
    h = harness("mi300x", partitions=True, wait=False)
    wait_until(lambda: h.publisher.counters_unsupported, what="the dropped counters to be noticed")
    whole_devices = [
        d["name"] for d in slices.without_partitions(slices.build(h.live.current()))[0].devices
    ]
    assert len(whole_devices) == 8

    def whole_devices_only() -> bool:
        published = h.published()
        names = [d["name"] for s in published for d in s["spec"].get("devices") or []]
        return len(published) == 1 and names == whole_devices

    wait_until(whole_devices_only, what="whole devices only")
    assert h.settle() == 0
    assert sum("dropped the shared counters" in r.getMessage() for r in caplog.records) == 1


def test_other_dropped_fields_are_accepted_once(api: FakeApiServer, harness, caplog) -> None:
    caplog.set_level(logging.ERROR)

    def no_pcie_root(plural: str, obj: dict) -> None:
        for device in obj["spec"].get("devices") or []:
            device["attributes"].pop("resource.kubernetes.io/pcieRoot", None)

    api.storage_hooks.append(no_pcie_root)
    h = harness("rbln-atom", wait=False)
    wait_until(lambda: h.publisher.stats.writes >= 1, what="a write")
    assert h.settle() == 0
    assert any("dropped fields" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("count", "layout"), [(1, [1]), (128, [128]), (129, [1, 128]), (300, [44, 128, 128])]
)
def test_pools_of_any_size_are_published_completely(
    harness, tmp_path: Path, count: int, layout: list[int]
) -> None:
    h = harness(str(write_profile(tmp_path / "node.yaml", count)))
    sizes = sorted(len(s["spec"]["devices"]) for s in h.published())
    assert sizes == layout
    names = {d["name"] for s in h.published() for d in s["spec"]["devices"]}
    assert len(names) == count


def test_a_writer_that_keeps_undoing_the_slices_is_answered_at_a_trickle(  # type: ignore[no-untyped-def]
    harness, api: FakeApiServer
) -> None:
    h = harness(limit=TokenBucket(burst=3, per_second=2.0))
    fighting = 2.0
    edits = 0
    until = time.monotonic() + fighting
    while time.monotonic() < until:  # another writer with its own idea of the pool
        edited = copy.deepcopy(h.published()[0])
        edited["spec"]["devices"][0]["attributes"]["fighter"] = {"int": edits}
        api.update("resource.k8s.io", "resourceslices", edited)
        edits += 1
        time.sleep(0.02)
    assert edits > 40
    # The burst, then one write per token: not one write per edit.
    assert h.publisher.stats.writes <= 1 + 3 + int(fighting * 2.0) + 1
    assert h.publisher.stats.postponed > 0
    wait_until(h.in_sync, what="the pool restored once the other writer stopped")
