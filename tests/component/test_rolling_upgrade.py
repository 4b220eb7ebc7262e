"""A rolling upgrade (maxSurge 1, maxUnavailable 0): two instances on one node at once.

Each has its own sockets named after its pod UID, both share the checkpoint, the CDI directory
and the cross-process locks, so a claim prepared by one is unprepared by the other, a device is
never given to two claims across instances, and the surviving instance serves everything after
the old one stops. Also: only one instance publishes, so the two never fight over the slices
even when they disagree about a device, and `unidra simulate` reaches each one by name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from driver import cdi, daemon
from driver.checkpoint import CheckpointStore
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.kubelet import client as kubelet
from driver.locks import FileLocks
from driver.model import HealthEvent
from support import commands
from support.claims import allocated_claim, result
from support.waiting import wait_until

OLD, NEW = "0b9e7c1a-1111-4e4e-9a9a-000000000001", "0b9e7c1a-2222-4e4e-9a9a-000000000002"
GPUS = [f"gpu-0000-{bus}-00-0" for bus in ("1b", "43", "52", "61", "9d", "c3")]


@pytest.fixture
def both(node) -> Iterator[tuple[daemon.Daemon, daemon.Daemon, kubelet.Plugin, kubelet.Plugin]]:  # type: ignore[no-untyped-def]
    old = daemon.start(node.settings(pod_uid=OLD))
    wait_until(lambda: old.leadership.leading, what="the old instance to publish")
    new = daemon.start(node.settings(pod_uid=NEW))
    found = kubelet.find_registration_sockets(node.registrar_dir)
    plugins = {path.name: kubelet.register(path, "unidra.dev") for path in found}
    try:
        yield (
            old,
            new,
            plugins[f"unidra.dev-{OLD}-reg.sock"],
            plugins[f"unidra.dev-{NEW}-reg.sock"],
        )
    finally:
        for plugin in plugins.values():
            plugin.close()
        new.stop()
        old.stop()


def claims_on_disk(node) -> tuple[set[str], set[str]]:  # type: ignore[no-untyped-def]
    """(claim UIDs in the checkpoint, claim UIDs with a CDI spec)."""
    store = CheckpointStore(
        node.plugin_dir / "checkpoint.json", FileLocks(node.plugin_dir / "serialize.lock")
    )
    prefix = cdi.spec_filename("unidra.dev", "").removesuffix(".json")
    specs = {p.name.removeprefix(prefix).removesuffix(".json") for p in node.cdi_root.iterdir()}
    return set(store.read().claims), specs


def test_each_instance_has_its_own_sockets(both, node) -> None:  # type: ignore[no-untyped-def]
    _, _, old, new = both
    assert old.info.endpoint == str(node.plugin_dir / f"dra-{OLD}.sock")
    assert new.info.endpoint == str(node.plugin_dir / f"dra-{NEW}.sock")
    assert {p.name for p in node.plugin_dir.glob("control*.sock")} == {
        f"control-{OLD}.sock",
        f"control-{NEW}.sock",
    }


def test_claims_move_freely_between_the_instances(both, node, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    _, _, old, new = both
    plugins = [old, new]
    claims = [allocated_claim(api, f"c{i}", [result(gpu, "node-a")]) for i, gpu in enumerate(GPUS)]
    for i, claim in enumerate(claims):
        assert plugins[i % 2].prepare([claim])[claim[2]].error == ""
    # The other instance answers a repeated prepare from the shared checkpoint, identically.
    for i, claim in enumerate(claims):
        assert plugins[(i + 1) % 2].prepare([claim]) == plugins[i % 2].prepare([claim])
    assert claims_on_disk(node) == ({c[2] for c in claims},) * 2
    for i, claim in enumerate(claims):
        assert plugins[(i + 1) % 2].unprepare([claim])[claim[2]].error == ""
    assert claims_on_disk(node) == (set(), set())


def test_a_device_is_never_given_to_two_claims_across_instances(  # type: ignore[no-untyped-def]
    both, api: FakeApiServer
) -> None:
    _, _, old, new = both
    first = allocated_claim(api, "first", [result(GPUS[0], "node-a")])
    second = allocated_claim(api, "second", [result(GPUS[0], "node-a")])
    assert old.prepare([first])[first[2]].error == ""
    assert "already prepared for claim" in new.prepare([second])[second[2]].error


def test_concurrent_calls_on_both_instances_keep_the_state_consistent(  # type: ignore[no-untyped-def]
    both, node, api: FakeApiServer
) -> None:
    _, _, old, new = both
    claims = [
        allocated_claim(api, f"race{i}", [result(GPUS[i % len(GPUS)], "node-a")]) for i in range(12)
    ]

    def prepare(index: int) -> str:
        plugin = (old, new)[index % 2]
        return plugin.prepare([claims[index]])[claims[index][2]].error

    with ThreadPoolExecutor(max_workers=12) as pool:
        errors = list(pool.map(prepare, range(12)))
    # Two claims per GPU: exactly one of each pair wins, whichever instance served it.
    winners = [claims[i][2] for i, error in enumerate(errors) if not error]
    assert len(winners) == len(GPUS)
    assert all("already prepared for claim" in e for e in errors if e)
    assert claims_on_disk(node) == (set(winners), set(winners))


def test_the_new_instance_serves_everything_after_the_old_one_stops(  # type: ignore[no-untyped-def]
    both, node, api: FakeApiServer
) -> None:
    old_daemon, _, old, new = both
    claim = allocated_claim(api, "kept", [result(GPUS[0], "node-a")])
    assert old.prepare([claim])[claim[2]].error == ""
    old_daemon.stop()
    assert not (node.plugin_dir / f"dra-{OLD}.sock").exists()
    assert not (node.registrar_dir / f"unidra.dev-{OLD}-reg.sock").exists()
    assert new.prepare([claim])[claim[2]].error == ""  # from the checkpoint
    assert new.unprepare([claim])[claim[2]].error == ""
    assert claims_on_disk(node) == (set(), set())


def test_the_two_publishers_agree_instead_of_fighting(both, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    wait_until(lambda: api.list("resource.k8s.io", "resourceslices"), what="a published pool")
    time.sleep(0.5)
    before = api.slice_writes()
    time.sleep(1.0)
    assert api.slice_writes() == before
    assert len(api.list("resource.k8s.io", "resourceslices")) == 1


def test_simulate_reaches_each_instance_by_name(both, node, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    """Two instances answer: simulate refuses to guess, and reaches the one named."""
    old_daemon, new_daemon, _, _ = both
    guess = commands.run_simulate(node.plugins_dir, "inject", f"--device={GPUS[1]}", "--fault=lost")
    assert guess.returncode == 1 and "name one with --pod-uid" in guess.stderr
    for uid, instance in ((OLD, old_daemon), (NEW, new_daemon)):
        commands.simulate(
            node.plugins_dir, "inject", f"--device={GPUS[1]}", "--fault=lost", f"--pod-uid={uid}"
        )
        wait_until(lambda i=instance: GPUS[1] in i.board.taints(), what="the named board to see it")


def test_only_the_publisher_writes_when_the_instances_disagree(  # type: ignore[no-untyped-def]
    both, api: FakeApiServer
) -> None:
    old_daemon, new_daemon, _, _ = both
    wait_until(lambda: old_daemon.publisher.stats.syncs, what="a published pool")
    assert old_daemon.leadership.leading and not new_daemon.leadership.leading
    writes = api.slice_writes()
    # Each hears of a different fault, as when a transient Xid reached only one of them.
    new_daemon.board.report(HealthEvent(GPUS[0], "xid", "79", "seen by the new instance only"))
    old_daemon.board.report(HealthEvent(GPUS[1], "lost", "", "seen by the old instance only"))
    wait_until(lambda: api.slice_writes() > writes, what="the publisher's taint")
    time.sleep(1.0)
    assert api.slice_writes() == writes + 1  # the publisher's one in-place update, no war
    device_taints = {
        d["name"]
        for item in api.list("resource.k8s.io", "resourceslices")
        for d in item["spec"]["devices"]
        if d.get("taints")
    }
    assert device_taints == {GPUS[1]}


def test_the_new_instance_takes_over_publishing_with_the_old_ones_health(  # type: ignore[no-untyped-def]
    both, api: FakeApiServer
) -> None:
    old_daemon, new_daemon, _, _ = both
    wait_until(lambda: old_daemon.publisher.stats.syncs, what="a published pool")
    published = api.slice_writes()
    old_daemon.board.report(HealthEvent(GPUS[2], "lost", "", "fell off the bus"))
    wait_until(lambda: api.slice_writes() > published, what="the old publisher's taint")
    assert GPUS[2] not in new_daemon.board.taints()
    writes = api.slice_writes()
    old_daemon.stop()
    wait_until(lambda: new_daemon.leadership.leading, what="the new instance to take over")
    assert GPUS[2] in new_daemon.board.taints()
    wait_until(lambda: new_daemon.publisher.stats.syncs, what="a sync by the new publisher")
    assert api.slice_writes() == writes  # the same view: nothing to rewrite
