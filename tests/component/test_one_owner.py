"""One owner per node, with real `unidra kubelet-plugin` processes on the same directories.

A second instance without a pod UID refuses to start, names the first one and touches nothing
of it; ports in use fail before any socket is touched; SIGTERM removes only the sockets the
instance created. In rolling-upgrade mode (distinct pod UIDs) exactly one instance publishes,
even when the two disagree about a device's health, and the new one takes over, with the old
one's conditions, only when the old one stops or dies, while both keep preparing claims.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from driver import control, instances
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.kubelet import client as kubelet
from support.claims import allocated_claim, result
from support.processes import Process, checkpoint_claims
from support.unix import listening, stale
from support.waiting import wait_until

OLD, NEW = "0b9e7c1a-1111-4e4e-9a9a-000000000001", "0b9e7c1a-2222-4e4e-9a9a-000000000002"
GPUS = [f"gpu-0000-{bus}-00-0" for bus in ("1b", "43", "52", "61", "9d", "c3")]


def inodes(*paths: Path) -> dict[Path, int]:
    return {path: os.lstat(path).st_ino for path in paths}


def taints(api: FakeApiServer) -> dict[str, list[dict]]:
    return {
        device["name"]: device["taints"]
        for item in api.list("resource.k8s.io", "resourceslices")
        for device in item["spec"].get("devices") or []
        if device.get("taints")
    }


def publisher_pid(node) -> int | None:  # type: ignore[no-untyped-def]
    holder = instances.publisher_lease(node.plugin_dir).holder()
    return holder.pid if holder else None


def register(node, pod_uid: str) -> kubelet.Plugin:  # type: ignore[no-untyped-def]
    path = node.registrar_dir / f"unidra.dev-{pod_uid}-reg.sock"
    wait_until(path.exists, timeout=30, what=f"{path.name}")
    return kubelet.register(path, "unidra.dev")


def test_a_second_instance_without_a_pod_uid_refuses_and_takes_nothing(  # type: ignore[no-untyped-def]
    node, api: FakeApiServer, processes
) -> None:
    first = Process(node)
    processes.append(first)
    plugin = first.wait_registered(node)
    dra = node.plugin_dir / "dra.sock"
    wait_until((node.plugin_dir / "control.sock").exists, what="the control socket, made last")
    served = inodes(
        dra, node.registrar_dir / "unidra.dev-reg.sock", node.plugin_dir / "control.sock"
    )

    second = Process(node, log="second.log")
    processes.append(second)

    assert second.proc.wait(timeout=60) == 1
    last = second.text().strip().splitlines()[-1]
    assert re.fullmatch(
        rf"unidra: another Unidra instance runs on this node: pid {first.proc.pid} on host "
        rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ, serving "
        rf"{re.escape(str(dra))}; stop it first \(only a rolling upgrade runs two instances, "
        r"each with its own POD_UID\)",
        last,
    ), last
    assert "Traceback" not in second.text() and "stale socket" not in second.text()
    assert inodes(*served) == served
    claim = allocated_claim(api, "still-served", [result(GPUS[0], "node-a")])
    assert plugin.prepare([claim])[claim[2]].error == ""  # the first one still answers
    plugin.close()


@pytest.mark.parametrize("port_flag", ["--metrics-address=127.0.0.1:{}", "--healthcheck-port={}"])
def test_a_port_in_use_fails_before_any_socket_is_touched(  # type: ignore[no-untyped-def]
    node, processes, port_flag: str
) -> None:
    node.plugin_dir.mkdir(parents=True)
    dra = node.plugin_dir / "dra.sock"
    stale(dra)
    left = inodes(dra)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1" if "metrics" in port_flag else "0.0.0.0", 0))
        taken.listen()
        process = Process(node, args=[port_flag.format(taken.getsockname()[1])])
        processes.append(process)
        assert process.proc.wait(timeout=60) == 1
    assert "unidra: cannot " in process.text()
    assert inodes(dra) == left
    assert not (node.registrar_dir / "unidra.dev-reg.sock").exists()
    assert not (node.plugin_dir / "instance.lock").exists()


def test_sigterm_removes_only_the_sockets_this_instance_created(  # type: ignore[no-untyped-def]
    node, processes
) -> None:
    process = Process(node)
    processes.append(process)
    process.wait_registered(node).close()
    registration = node.registrar_dir / "unidra.dev-reg.sock"
    os.unlink(registration)
    with listening(registration):  # someone else's socket at the same path now
        theirs = inodes(registration)
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(timeout=30) == 0, process.text()
        assert inodes(registration) == theirs
    assert not (node.plugin_dir / "dra.sock").exists()
    assert not (node.plugin_dir / "control.sock").exists()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill -9"])
def test_rolling_upgrade_one_publisher_then_a_handover_that_keeps_health(  # type: ignore[no-untyped-def]
    node, api: FakeApiServer, processes, stop: signal.Signals
) -> None:
    old = Process(node, args=[f"--pod-uid={OLD}"], log="old.log")
    processes.append(old)
    old_plugin = register(node, OLD)
    wait_until(lambda: publisher_pid(node) == old.proc.pid, what="the old instance to publish")
    wait_until(lambda: api.slice_writes() == 1, what="the pool")
    new = Process(node, args=[f"--pod-uid={NEW}"], log="new.log")
    processes.append(new)
    new_plugin = register(node, NEW)

    # Only the old instance hears of a fault: the two disagree about the device's health.
    control.request(
        node.plugin_dir / f"control-{OLD}.sock",
        {"command": "inject", "device": GPUS[1], "fault": "lost"},
    )
    wait_until(lambda: api.slice_writes() == 2, what="the old publisher's taint")
    assert GPUS[1] in taints(api)
    writes = api.slice_writes()
    claims = [allocated_claim(api, f"c{i}", [result(GPUS[i], "node-a")]) for i in range(4)]
    for i, claim in enumerate(claims[:2]):
        assert (old_plugin, new_plugin)[i].prepare([claim])[claim[2]].error == ""
    time.sleep(1.0)
    assert api.slice_writes() == writes, "the instance that does not publish wrote slices"
    assert publisher_pid(node) == old.proc.pid

    if stop == signal.SIGTERM:
        old.proc.send_signal(stop)
        assert old.proc.wait(timeout=30) == 0, old.text()
    else:
        old.proc.kill()
        old.proc.wait(timeout=30)
    wait_until(lambda: publisher_pid(node) == new.proc.pid, what="the new instance to take over")
    wait_until(lambda: "conditions_adopted=1" in new.text(), what="the old one's fault adopted")
    for claim in claims[2:]:  # prepares went on during the handover
        assert new_plugin.prepare([claim])[claim[2]].error == ""
    time.sleep(1.0)
    assert GPUS[1] in taints(api), "the handover forgot the old instance's fault"
    assert api.slice_writes() == writes, "the handover rewrote slices that were right"
    for claim in claims:
        assert new_plugin.unprepare([claim])[claim[2]].error == ""
    assert checkpoint_claims(node) == {}
    old_plugin.close()
    new_plugin.close()
