"""What a restart keeps and a reboot does not: device conditions with their hold times survive a
restart (and kill -9) and keep their taints without a single slice write; after a reboot (another
boot ID under the host root) the node starts clean, and the checkpoint records the boot."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.model import HealthEvent
from support import commands
from support.claims import allocated_claim, result
from support.processes import Process
from support.waiting import wait_until

GPU0, GPU1 = "gpu-0000-1b-00-0", "gpu-0000-43-00-0"
BOOT, NEXT_BOOT = "5a08ef26-5920-460a-8dc5-da6e2bb69105", "0b8f1c77-1e2d-4a3b-9c4d-5e6f7a8b9c0d"


def host_root(node, boot_id: str) -> Path:  # type: ignore[no-untyped-def]
    root = node.root / "host"
    path = root / "proc/sys/kernel/random/boot_id"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(boot_id + "\n")
    return root


def taints(api: FakeApiServer) -> dict[str, str]:
    return {
        d["name"]: d["taints"][0]["value"]
        for item in api.list("resource.k8s.io", "resourceslices")
        for d in item["spec"]["devices"]
        if d.get("taints")
    }


def checkpoint_boot(node) -> str:  # type: ignore[no-untyped-def]
    return str(json.loads((node.plugin_dir / "checkpoint.json").read_text())["bootID"])


def test_a_restart_keeps_conditions_hold_times_and_taints(node, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    root = host_root(node, BOOT)
    with node.serve(host_root=root) as (first, _):
        wait_until(lambda: first.publisher.stats.syncs, what="the pool")
        first.board.report(HealthEvent(GPU0, "lost", "", "fell off the bus"))
        first.board.report(HealthEvent(GPU1, "xid", "79", "transient"))
        wait_until(lambda: len(taints(api)) == 2, what="both taints")
        wait_until(lambda: first.publisher.stats.writes == 2, what="the taints written")
        held = first.board.taints()
        deadline = first.board.next_deadline()
    writes = api.slice_writes()

    with node.serve(host_root=root) as (second, _):
        assert second.board.taints() == held
        assert second.board.next_deadline() == deadline  # the Xid's quiet period runs on
        wait_until(lambda: second.publisher.stats.syncs, what="a sync after the restart")
        assert api.slice_writes() == writes, "the restart rewrote slices that were right"
    assert taints(api) == {GPU0: "lost", GPU1: "xid-79"}


def test_kill_9_keeps_an_injected_fault(node, api: FakeApiServer, processes) -> None:  # type: ignore[no-untyped-def]
    crashing = Process(node)
    processes.append(crashing)
    crashing.wait_registered(node).close()
    commands.simulate(node.plugins_dir, "inject", f"--device={GPU0}", "--fault=ecc-dbe")
    wait_until(lambda: GPU0 in taints(api), what="the taint")
    crashing.proc.kill()
    crashing.proc.wait(timeout=30)

    restarted = Process(node)
    processes.append(restarted)
    restarted.wait_registered(node).close()
    wait_until(lambda: "Device conditions carried over" in Process.output(node), what="the log")
    assert taints(api) == {GPU0: "ecc-uncorrectable-dbe"}
    health = commands.simulate(node.plugins_dir, "health")
    assert f"{GPU0}  Unhealthy  double-bit ECC error (injected)" in health.splitlines()


def test_a_reboot_starts_clean_and_the_checkpoint_notices(  # type: ignore[no-untyped-def]
    node, api: FakeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    claim = allocated_claim(api, "across-reboot", [result(GPU1, "node-a")])
    with node.serve(host_root=host_root(node, BOOT)) as (first, plugin):
        answer = plugin.prepare([claim])
        first.board.report(HealthEvent(GPU0, "lost", "", "fell off the bus"))
        wait_until(lambda: GPU0 in taints(api), what="the taint")
    assert checkpoint_boot(node) == BOOT

    with (
        caplog.at_level(logging.INFO),
        node.serve(host_root=host_root(node, NEXT_BOOT)) as (second, plugin),
    ):
        assert second.board.taints() == {}
        wait_until(lambda: not taints(api), what="the pre-reboot taint to go")
        assert plugin.prepare([claim]) == answer  # kubelet's prepared claims are kept
    assert checkpoint_boot(node) == NEXT_BOOT
    assert "The node rebooted since the checkpoint was written" in caplog.text
    assert "rebooted since device health was saved" in caplog.text
