"""The API server misbehaves: 500, 429 and 503 answers, slow and hanging answers, write
conflicts, and an outage. Prepare fails per claim and succeeds on kubelet's retry; what needs
no API server keeps working during an outage; and afterwards the slices are restored, with any
health change from the outage, and nothing is lost."""

from __future__ import annotations

import time

import pytest

from driver.demo.apiserver import ApiServer as FakeApiServer
from support.claims import allocated_claim, result
from support.reliability import TALLY, budget
from support.waiting import wait_until

GPU0, GPU1, GPU2 = "gpu-0000-1b-00-0", "gpu-0000-43-00-0", "gpu-0000-52-00-0"


def claim_gets(method: str, path: str) -> bool:
    return method == "GET" and "/resourceclaims/" in path and not path.endswith("/status")


def devices(api: FakeApiServer) -> dict[str, dict]:
    return {
        d["name"]: d
        for s in api.list("resource.k8s.io", "resourceslices")
        for d in s["spec"].get("devices") or []
    }


@pytest.mark.parametrize("status", [500, 503, 429, 409])
def test_an_api_error_fails_the_claim_and_the_retry_succeeds(
    running, api: FakeApiServer, status: int
) -> None:  # type: ignore[no-untyped-def]
    _, plugin = running
    claim = allocated_claim(api, f"flaky-{status}", [result(GPU0, "node-a")])
    api.fail(claim_gets, status=status, times=1)
    first = plugin.prepare([claim])[claim[2]]
    assert first.error.startswith(f"reading claim default/flaky-{status}"), first.error
    assert plugin.prepare([claim])[claim[2]].error == ""  # kubelet's retry
    TALLY[f"faults: claim GET answered {status}, retried"] += 1


def test_a_slow_api_server_only_slows_the_prepare(running, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    _, plugin = running
    claim = allocated_claim(api, "slow", [result(GPU0, "node-a")])
    api.fail(claim_gets, status=None, delay=2.0, times=1)
    started = time.monotonic()
    assert plugin.prepare([claim])[claim[2]].error == ""
    assert time.monotonic() - started >= 2.0
    TALLY["faults: 2 s slow claim GET"] += 1


@pytest.mark.skipif(budget("hang_seconds") == 0, reason="only in full runs (15 s client timeout)")
def test_a_hanging_api_server_times_out_per_claim(running, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    _, plugin = running
    claim = allocated_claim(api, "hanging", [result(GPU0, "node-a")])
    api.fail(claim_gets, status=None, delay=budget("hang_seconds"), times=1)
    answer = plugin.prepare([claim])[claim[2]]
    assert "unreachable" in answer.error or "timed out" in answer.error.lower(), answer.error
    assert plugin.prepare([claim])[claim[2]].error == ""
    TALLY["faults: claim GET hanging past the client timeout"] += 1


def test_a_frozen_api_server_costs_a_call_one_budget_not_a_timeout_per_claim(  # type: ignore[no-untyped-def]
    running, api: FakeApiServer
) -> None:
    """Kubelet gives up on a whole call after 45 s; claims waiting for a frozen API server must
    not add up to that. CI calls with a 4 s deadline; the full run with kubelet's 45 s and a
    claim GET hanging past the client's 15 s read timeout."""
    _, plugin = running
    gpus = [f"gpu-0000-{bus}-00-0" for bus in ("1b", "43", "52", "61", "9d", "c3", "d1", "df")]
    ready = allocated_claim(api, "ready", [result(gpus[0], "node-a")])
    assert plugin.prepare([ready])[ready[2]].error == ""
    frozen = [
        allocated_claim(api, f"frozen-{i}", [result(gpu, "node-a")])
        for i, gpu in enumerate(gpus[1:])
    ]
    full = budget("hang_seconds") > 0
    client_timeout, hang = (45.0, budget("hang_seconds")) if full else (4.0, 6.0)
    api.fail(claim_gets, status=None, delay=hang, times=None)
    started = time.monotonic()
    answers = plugin.prepare([ready, *frozen], timeout=client_timeout)
    took = time.monotonic() - started
    assert answers[ready[2]].error == ""  # answered from the checkpoint meanwhile
    for claim in frozen:
        error = answers[claim[2]].error
        assert error.startswith(
            (f"reading claim default/{claim[1]}", f"prepare of claim default/{claim[1]}")
        ), error
        assert "budget" in error or "timed out" in error.lower(), error
    assert took < (30.0 if full else client_timeout), took
    api.clear_faults()
    retried = plugin.prepare(frozen)
    assert all(answer.error == "" for answer in retried.values())
    TALLY[f"faults: {len(frozen)} claims of one call under a frozen API server, {took:.1f} s"] += 1


def test_slice_write_conflicts_are_retried(running, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    instance, _ = running
    wait_until(lambda: GPU2 in devices(api), what="the pool")
    api.fail(lambda m, p: m == "PUT" and "/resourceslices/" in p, status=409, times=2)
    instance.board.report(_lost(GPU2))
    wait_until(lambda: devices(api)[GPU2].get("taints"), what="the taint despite conflicts")
    TALLY["faults: slice update conflicts"] += 2


def test_an_outage_loses_nothing(running, api: FakeApiServer, node) -> None:  # type: ignore[no-untyped-def]
    instance, plugin = running
    wait_until(lambda: GPU1 in devices(api), what="the pool")
    kept = allocated_claim(api, "kept", [result(GPU0, "node-a")])
    new = allocated_claim(api, "new", [result(GPU1, "node-a")])
    kept_answer = plugin.prepare([kept])[kept[2]]
    assert kept_answer.error == ""
    seconds = budget("outage_seconds")
    with api.outage():
        # Kubelet wipes the node's slices meanwhile (as on its restart); nobody hears of it.
        for item in api.list("resource.k8s.io", "resourceslices"):
            api.delete("resource.k8s.io", "resourceslices", item["metadata"]["name"])
        assert plugin.prepare([kept])[kept[2]] == kept_answer  # from the checkpoint
        failed = plugin.prepare([new])[new[2]]
        assert "unreachable" in failed.error
        instance.board.report(_lost(GPU1))  # a fault during the outage
        time.sleep(seconds)
        assert plugin.unprepare([kept])[kept[2]].error == ""  # needs no API server
    wait_until(
        lambda: GPU1 in devices(api) and devices(api)[GPU1].get("taints"),
        timeout=60,
        what="slices restored, with the fault from the outage",
    )
    assert len(devices(api)) == 8
    assert plugin.prepare([new])[new[2]].error == ""
    TALLY[f"faults: {seconds} s outage"] += 1


def _lost(device: str):  # type: ignore[no-untyped-def]
    from driver.model import HealthEvent

    return HealthEvent(device, "lost", message="fell off the bus")
