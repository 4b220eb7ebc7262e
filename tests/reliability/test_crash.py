"""kill -9 at random moments under a stream of prepare and unprepare calls, then restart.

After every restart the node's state must agree with itself and with what kubelet was told:
every recorded claim has its CDI spec and no spec lacks a record; no device is held by two
claims, except by shares (consumable capacity) that together fit it and meet no exclusive
holder; a claim kubelet was told is prepared is still prepared, with the same answer; a claim
kubelet was told is unprepared is gone; and unpreparing everything always succeeds.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import dataclass

import grpc

from driver import cdi
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.kubelet import client as kubelet
from support.claims import allocated_claim, result, share
from support.processes import Process, checkpoint_claims
from support.reliability import TALLY, budget

GPUS = [f"gpu-0000-{bus}-00-0" for bus in ("1b", "43", "52", "61", "9d", "c3")]
# Shared by 30Gi shares, two of which fit each; one exclusive claim wants the first one too.
SHARED = ["gpu-0000-d1-00-0", "gpu-0000-df-00-0"]
MEMORY = 85520809984  # of a simulated H100 80GB
REFUSALS = ("already prepared for", "would use", "cannot join them")


@dataclass
class Told:
    """What kubelet last heard about a claim: True prepared, False unprepared, None unknown."""

    prepared: bool | None = None
    answer: object = None


def test_random_kills_leave_consistent_state(node, api: FakeApiServer, processes) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(int(os.environ.get("UNIDRA_RELIABILITY_SEED", "20261128")))
    for round_ in range(budget("crash_rounds")):
        # Ten claims over six GPUs: some prepares must be refused for exclusivity. Six 30Gi
        # shares over two GPUs, and a whole claim of one of them: some must be refused for room.
        claims = [
            allocated_claim(api, f"r{round_}-c{i}", [result(GPUS[i % len(GPUS)], "node-a")])
            for i in range(10)
        ]
        claims += [
            allocated_claim(api, f"r{round_}-s{i}", [share(SHARED[i % 2], "node-a", "30Gi")])
            for i in range(6)
        ]
        claims.append(allocated_claim(api, f"r{round_}-w", [result(SHARED[0], "node-a")]))
        daemon = Process(node, argv=[*node.argv(), "--sharing"])
        processes.append(daemon)
        plugin = daemon.wait_registered(node)
        told = {claim[2]: Told() for claim in claims}
        kill = threading.Timer(rng.uniform(0.02, 0.4), os.kill, (daemon.proc.pid, signal.SIGKILL))
        kill.start()
        calls = drive(plugin, claims, told, rng)
        kill.join()
        daemon.stop()
        plugin.close()
        TALLY["crash: kills"] += 1
        TALLY["crash: calls before the kill"] += calls

        restarted = Process(node, argv=[*node.argv(), "--sharing"])
        processes.append(restarted)
        plugin = restarted.wait_registered(node)
        check(node, plugin, claims, told)
        plugin.close()
        restarted.stop()
        TALLY["crash: restarts checked"] += 1


def drive(
    plugin: kubelet.Plugin,
    claims: list[tuple[str, str, str]],
    told: dict[str, Told],
    rng: random.Random,
) -> int:
    """Random prepares and unprepares until the daemon dies; returns the calls completed."""
    calls = 0
    while True:
        batch = rng.sample(claims, rng.choice((1, 1, 1, 2)))
        prepare = rng.random() < 0.6
        try:
            answers = plugin.prepare(batch) if prepare else plugin.unprepare(batch)
        except grpc.RpcError:
            for claim in batch:
                told[claim[2]] = Told()  # in flight when killed: either outcome is allowed
            return calls
        calls += 1
        for claim in batch:
            answer = answers[claim[2]]
            if answer.error:
                assert not prepare or any(r in answer.error for r in REFUSALS), answer.error
                TALLY["crash: prepares refused (exclusive or full)"] += 1
                continue  # refused: what kubelet knew before still holds
            told[claim[2]] = Told(prepared=prepare, answer=answer if prepare else None)


def check(
    node,  # type: ignore[no-untyped-def]
    plugin: kubelet.Plugin,
    claims: list[tuple[str, str, str]],
    told: dict[str, Told],
) -> None:
    recorded = checkpoint_claims(node)
    specs = cdi.claim_specs(node.cdi_root, "unidra.dev")
    assert set(recorded) == set(specs), "a record without its spec, or an orphan spec"
    exclusive: dict[str, str] = {}
    shared: dict[str, int] = {}
    for uid, claim in recorded.items():
        for device in claim.devices:
            if device.share_id is None:
                assert device.device not in exclusive, f"{device.device} held by two claims"
                exclusive[device.device] = uid
            else:
                shared[device.device] = shared.get(device.device, 0) + device.consumed["memory"]
    assert not set(exclusive) & set(shared), "an exclusive claim next to shares"
    assert all(used <= MEMORY for used in shared.values()), f"shares beyond a device: {shared}"
    for claim in claims:
        state = told[claim[2]]
        if state.prepared is True:
            assert claim[2] in recorded, "a claim kubelet was told is prepared was lost"
            assert plugin.prepare([claim])[claim[2]] == state.answer, "a different answer"
        elif state.prepared is False:
            assert claim[2] not in recorded, "a claim kubelet was told is unprepared came back"
    answers = plugin.unprepare(claims)
    assert all(answer.error == "" for answer in answers.values())
    assert checkpoint_claims(node) == {}
    assert cdi.claim_specs(node.cdi_root, "unidra.dev") == {}
