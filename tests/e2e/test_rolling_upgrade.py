"""A rolling upgrade on a real kubelet: two instances with per-pod sockets, and no prepare fails in the handover."""

from __future__ import annotations

import json
import signal
import threading

from e2e.plugin import (
    PluginProcess,
    apply,
    claim_template,
    delete_pods,
    device_request,
    ensure_namespace,
    pod,
    wait_pod_ready,
    wait_published,
)

from driver.localcluster import LocalCluster
from support.waiting import wait_until

NS = "e2e-upgrade"
OLD, NEW = "11111111-old0-4000-8000-000000000001", "22222222-new0-4000-8000-000000000002"


def _failed_prepares(cluster: LocalCluster) -> list[str]:
    events = json.loads(cluster.kubectl("get", "events", "-n", NS, "-o", "json").stdout)["items"]
    return [
        f"{e['involvedObject']['name']}: {e['message']}"
        for e in events
        if e["type"] == "Warning" and "Prepare" in e.get("reason", "")
    ]


def test_pods_keep_starting_while_a_new_instance_takes_over(
    cluster: LocalCluster, installed: str
) -> None:
    ensure_namespace(cluster, NS)
    apply(cluster, claim_template("one-gpu", NS, {"devices": {"requests": [device_request()]}}))
    old = PluginProcess(cluster, pod_uid=OLD, name="old").start()
    # Kubelet unprepares a deleted pod's claims a little after the pod is gone; an earlier test's
    # claim still holding a GPU would make a first prepare wait for it (a retry, and an event).
    wait_until(lambda: not old.checkpoint(), timeout=60, what="earlier tests' claims to go")
    new = PluginProcess(cluster, pod_uid=NEW, name="new")
    wait_published(cluster, 8)
    started: list[str] = []
    handover = threading.Event()

    def start_pods() -> None:
        # Pods start before, during and after the handover; each holds a GPU until the end.
        for index in range(8):
            name = f"during-upgrade-{index}"
            apply(cluster, pod(name, NS, templates={"gpu": "one-gpu"}))
            started.append(name)
            if index == 2:
                handover.wait(60)

    starter = threading.Thread(target=start_pods)
    starter.start()
    try:
        wait_pod_ready(cluster, NS, "during-upgrade-0")
        new.start()  # the surge pod registers its own sockets next to the old ones
        handover.set()
        assert old.stop(signal.SIGTERM) == 0  # the old pod goes once the new one is ready
        starter.join(120)
        for name in started:
            wait_pod_ready(cluster, NS, name, timeout=90)
        assert len(started) == 8
        assert _failed_prepares(cluster) == []
        claims = new.checkpoint()
        assert (
            len(claims) == 8
        )  # one checkpoint, shared: the old instance's claims are the new one's
    finally:
        handover.set()
        starter.join(120)
        delete_pods(cluster, NS)
        new.stop()
        old.stop()
