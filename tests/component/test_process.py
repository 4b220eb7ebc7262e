"""The `unidra kubelet-plugin` process: graceful SIGTERM, and kill -9 mid-prepare repaired on the next start.

Crashes are placed exactly with UNIDRA_CRASHPOINT (driver.crashpoints), so every interrupted
state is reproduced deterministically.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from driver import cdi, crashpoints
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.kubelet import client as kubelet
from support.claims import allocated_claim, result
from support.processes import Process, checkpoint_claims

REPO = Path(__file__).resolve().parents[2]
POOL = "node-a"


def test_sigterm_finishes_in_flight_calls_and_removes_both_sockets(
    node, api: FakeApiServer, processes
) -> None:
    process = Process(node)
    processes.append(process)
    plugin = process.wait_registered(node)
    claim = allocated_claim(api, "slow", [result("gpu-0000-1b-00-0", POOL)])
    # Hold the claim GET in the API server so the call is in flight when SIGTERM arrives.
    fault = api.fail(
        lambda method, path: path.endswith("/resourceclaims/slow"), status=None, delay=1.5
    )
    answers: list[kubelet.ClaimResult] = []
    caller = threading.Thread(target=lambda: answers.append(plugin.prepare([claim])[claim[2]]))
    caller.start()
    deadline = time.monotonic() + 10
    while fault.hits == 0 and time.monotonic() < deadline:
        time.sleep(0.005)

    process.proc.send_signal(signal.SIGTERM)
    caller.join(timeout=30)

    assert process.proc.wait(timeout=30) == 0, process.output(node)
    assert answers and answers[0].error == "" and len(answers[0].devices) == 1
    assert not (node.registrar_dir / "unidra.dev-reg.sock").exists()
    assert not (node.plugin_dir / "dra.sock").exists()
    plugin.close()


def test_kill_during_prepare_is_rolled_back_on_next_start(
    node, api: FakeApiServer, processes
) -> None:
    crashing = Process(node, crashpoint="prepare-after-cdi")
    processes.append(crashing)
    plugin = crashing.wait_registered(node)
    claim = allocated_claim(api, "interrupted", [result("gpu-0000-1b-00-0", POOL)])
    with pytest.raises(grpc.RpcError):
        plugin.prepare([claim])
    plugin.close()
    assert crashing.proc.wait(timeout=30) == -signal.SIGKILL
    # Killed between the durable CDI spec and the checkpoint entry: kubelet got no answer.
    assert claim[2] not in checkpoint_claims(node)
    assert claim[2] in cdi.claim_specs(node.cdi_root, "unidra.dev")

    restarted = Process(node)
    processes.append(restarted)
    plugin = restarted.wait_registered(node)

    assert claim[2] not in checkpoint_claims(node)
    assert cdi.claim_specs(node.cdi_root, "unidra.dev") == {}
    assert "Removed CDI specs of claims not in the checkpoint" in Process.output(node)
    answer = plugin.prepare([claim])[claim[2]]  # kubelet's retry succeeds
    assert answer.error == "" and len(answer.devices) == 1
    plugin.close()


def test_kill_during_unprepare_is_finished_by_kubelet_retry(
    node, api: FakeApiServer, processes
) -> None:
    crashing = Process(node, crashpoint="unprepare-after-record-removed")
    processes.append(crashing)
    plugin = crashing.wait_registered(node)
    claim = allocated_claim(api, "leaving", [result("gpu-0000-1b-00-0", POOL)])
    assert plugin.prepare([claim])[claim[2]].error == ""
    with pytest.raises(grpc.RpcError):
        plugin.unprepare([claim])
    plugin.close()
    crashing.proc.wait(timeout=30)
    # Killed between dropping the record and removing the spec: a spec without a record.
    assert claim[2] not in checkpoint_claims(node)
    assert claim[2] in cdi.claim_specs(node.cdi_root, "unidra.dev")

    restarted = Process(node)
    processes.append(restarted)
    plugin = restarted.wait_registered(node)
    # Recovery removed the orphan spec; kubelet's retried unprepare succeeds all the same.
    assert cdi.claim_specs(node.cdi_root, "unidra.dev") == {}
    assert plugin.unprepare([claim])[claim[2]].error == ""
    assert claim[2] not in checkpoint_claims(node)
    plugin.close()


def test_every_crashpoint_is_exercised_by_a_test() -> None:
    source = Path(__file__).read_text()
    assert all(point in source for point in crashpoints.POINTS)
