"""Reliability on a real node: one owner at a time, kill -9 in a burst, a frozen API server, a full disk."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.plugin import (
    PluginProcess,
    apply,
    claim_template,
    delete_pods,
    device_request,
    ensure_namespace,
    pod,
    pod_claims,
    pod_object,
    slices,
    wait_pod_ready,
    wait_published,
)

from driver.checkpoint import CheckpointStore
from driver.localcluster import LocalCluster
from driver.locks import FileLocks
from support.waiting import wait_until

NS = "e2e-reliability"
UMOUNT = "/usr/bin/umount"


@pytest.fixture(scope="module")
def namespace(cluster: LocalCluster, installed: str) -> str:
    ensure_namespace(cluster, NS)
    apply(cluster, claim_template("one-gpu", NS, {"devices": {"requests": [device_request()]}}))
    return NS


@pytest.fixture
def clean(cluster: LocalCluster, namespace: str) -> None:
    """Each test starts with every GPU free and nothing prepared, and ends its pods with
    `_finish` while its plugin still runs (kubelet unprepares through it)."""
    if _recorded(cluster):  # an earlier module stopped its plugin before kubelet unprepared
        with PluginProcess(cluster, name="drain"):
            wait_until(lambda: not _recorded(cluster), timeout=60, what="leftover claims to go")


def _finish(cluster: LocalCluster) -> None:
    delete_pods(cluster, NS)
    wait_until(lambda: not _recorded(cluster), timeout=60, what="kubelet to unprepare every claim")


def _recorded(cluster: LocalCluster) -> dict[str, object]:
    """The claims the node's checkpoint holds (kubelet unprepares a little after pods are gone)."""
    checkpoint = cluster.plugins_dir / "unidra.dev" / "checkpoint.json"
    if not checkpoint.exists():
        return {}
    locks = FileLocks(checkpoint.with_name("serialize.lock"))
    return dict(CheckpointStore(checkpoint, locks).read().claims)


def _inode(path: Path) -> int:
    return os.stat(path).st_ino


def _published_by(process: PluginProcess) -> bool:
    return process.samples("unidra_publishing") == {(): 1.0}


def _devices_of(cluster: LocalCluster, names: list[str]) -> list[str]:
    devices = []
    for name in names:
        (claim,) = pod_claims(cluster, NS, name)
        devices += [r["device"] for r in claim["status"]["allocation"]["devices"]["results"]]
    return devices


def _start_pods(cluster: LocalCluster, names: list[str]) -> None:
    apply(cluster, *(pod(name, NS, templates={"gpu": "one-gpu"}) for name in names))


def _assert_state_agrees(process: PluginProcess) -> None:
    """Every recorded claim has its CDI spec, and every spec its record."""
    recorded = set(process.checkpoint())
    specs = {
        p.name.removeprefix("k8s.unidra.dev-claim_").removesuffix(".json")
        for p in process.cdi_specs()
    }
    assert recorded == specs


def test_a_second_instance_without_a_pod_uid_refuses_and_steals_nothing(
    cluster: LocalCluster, namespace: str, clean: None
) -> None:
    with PluginProcess(cluster, name="first") as first:
        sockets = [cluster.registrar_dir / "unidra.dev-reg.sock", first.plugin_dir / "dra.sock"]
        before = [_inode(s) for s in sockets]
        second = PluginProcess(cluster, name="second").start(wait=False)
        assert second.process is not None
        assert second.process.wait(60) != 0
        refusal = [line for line in second.output().splitlines() if line.strip()]
        assert refusal[-1].startswith("unidra: another Unidra instance runs on this node: pid")
        assert str(first.process.pid if first.process else "") in refusal[-1]
        assert [_inode(s) for s in sockets] == before  # the live instance's sockets are untouched
        _start_pods(cluster, ["after-refusal"])
        wait_pod_ready(cluster, NS, "after-refusal")  # and it still serves kubelet
        _finish(cluster)


def test_two_instances_with_pod_uids_have_one_publisher_and_no_write_war(
    cluster: LocalCluster, namespace: str, clean: None
) -> None:
    old_uid, new_uid = (
        "3a1f0000-0000-4000-8000-000000000001",
        "3a1f0000-0000-4000-8000-000000000002",
    )
    with (
        PluginProcess(
            cluster, pod_uid=old_uid, name="old", args=["--health-min-hold-seconds=0"]
        ) as old,
        PluginProcess(
            cluster, pod_uid=new_uid, name="new", args=["--health-min-hold-seconds=0"]
        ) as new,
    ):
        wait_published(cluster, 8)
        wait_until(
            lambda: _published_by(old) != _published_by(new), timeout=30, what="one publisher"
        )
        # A fault only the instance that does not publish hears of: the two disagree.
        follower = new if _published_by(old) else old
        subprocess.run(
            [
                *follower.argv[:3],
                "simulate",
                "inject",
                "--device=gpu-0000-1b-00-0",
                "--fault=xid-119",
                f"--pod-uid={follower.pod_uid}",
                f"--kubelet-plugins-directory-path={cluster.plugins_dir}",
            ],
            check=True,
            capture_output=True,
        )
        versions = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            versions |= {s["metadata"]["resourceVersion"] for s in slices(cluster)}
            time.sleep(0.1)
        assert len(versions) <= 2, versions  # no rewrite storm, at most one settled change
        _start_pods(cluster, ["served-by-either"])
        wait_pod_ready(cluster, NS, "served-by-either")
        _finish(cluster)


def test_kill_9_during_an_eight_pod_burst_loses_nothing(
    cluster: LocalCluster, namespace: str, clean: None
) -> None:
    names = [f"burst-{n}" for n in range(8)]
    process = PluginProcess(cluster, name="burst").start()
    try:
        _start_pods(cluster, names)
        wait_until(lambda: process.checkpoint(), timeout=60, what="the first prepared claim")
        process.stop(signal.SIGKILL)
        process.start()
        wait_until(lambda: process.checkpoint(), timeout=30, what="the restarted plugin")
        process.stop(signal.SIGKILL)  # killed again right after its restart
        process.start()
        for name in names:
            wait_pod_ready(cluster, NS, name, timeout=120)
        devices = _devices_of(cluster, names)
        assert len(set(devices)) == 8
        assert len(process.checkpoint()) == 8
        _assert_state_agrees(process)
    finally:
        _finish(cluster)
        process.stop()


def test_a_frozen_api_server_during_pod_start_only_delays_it(
    cluster: LocalCluster, namespace: str, clean: None
) -> None:
    apiserver = cluster.components["kube-apiserver"].process
    assert apiserver is not None
    with PluginProcess(cluster, name="frozen") as process:
        _start_pods(cluster, ["through-the-freeze"])
        wait_until(
            lambda: (
                (pod_object(cluster, NS, "through-the-freeze") or {})
                .get("spec", {})
                .get("nodeName")
            ),
            timeout=30,
            what="the pod to be scheduled",
        )
        apiserver.send_signal(signal.SIGSTOP)
        try:
            time.sleep(20)  # kubelet calls prepare meanwhile; the claim GET cannot answer
        finally:
            apiserver.send_signal(signal.SIGCONT)
        wait_pod_ready(cluster, NS, "through-the-freeze", timeout=120)
        _assert_state_agrees(process)
        _finish(cluster)


@pytest.fixture
def tiny_cdi_root(cluster: LocalCluster) -> Iterator[Path]:
    """A CDI root on a 16 KiB tmpfs, so the disk can be filled."""
    root = cluster.workdir / "tiny-cdi"
    root.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "tmpfs", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield root
    subprocess.run([UMOUNT, "--lazy", str(root)], capture_output=True, check=False)


def test_a_full_cdi_disk_is_a_clear_per_claim_error_and_heals(
    cluster: LocalCluster, namespace: str, clean: None, tiny_cdi_root: Path
) -> None:
    filler = tiny_cdi_root / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 1024):
            pass
    except OSError:
        pass  # the disk is full
    finally:
        os.close(fd)
    process = PluginProcess(cluster, name="full-disk", cdi_root=tiny_cdi_root).start()
    try:
        _start_pods(cluster, ["on-a-full-disk"])

        def failed_prepare() -> str:
            events = cluster.get_json(f"/api/v1/namespaces/{NS}/events")["items"]
            return next(
                (
                    e["message"]
                    for e in events
                    if e["involvedObject"]["name"] == "on-a-full-disk" and "Prepare" in e["reason"]
                ),
                "",
            )

        message = wait_until(
            failed_prepare, timeout=60, what="kubelet's event for the failed prepare"
        )
        assert "No space left on device" in message and str(tiny_cdi_root) in message
        assert "Traceback" not in process.output()
        filler.unlink()
        wait_pod_ready(cluster, NS, "on-a-full-disk", timeout=120)  # kubelet retried, and it worked
        _assert_state_agrees(process)
    finally:
        _finish(cluster)
        process.stop()
