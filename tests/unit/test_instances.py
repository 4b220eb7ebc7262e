"""One owner per node: instance and publisher locks, their records, and what a dead holder leaves."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from driver import instances
from driver.errors import FatalError
from driver.instances import InstanceRecord, Lease

REPO = Path(__file__).resolve().parents[2]
OLD, NEW = "0b9e7c1a-1111-4e4e-9a9a-000000000001", "0b9e7c1a-2222-4e4e-9a9a-000000000002"


def record(pod_uid: str = "", pid: int = 4242) -> InstanceRecord:
    return InstanceRecord(
        pid=pid,
        started="2026-11-28T10:00:00Z",
        host="node-a",
        pod_uid=pod_uid,
        sockets=("/var/lib/kubelet/plugins/unidra.dev/dra.sock",),
    )


def test_the_same_sockets_are_refused_with_the_owner_named(tmp_path: Path) -> None:
    owner = instances.claim_instance(tmp_path, None, record())
    with pytest.raises(FatalError) as refused:
        instances.claim_instance(tmp_path, None, record(pid=7))
    assert str(refused.value) == (
        "another Unidra instance runs on this node: pid 4242 on host node-a, started "
        "2026-11-28T10:00:00Z, serving /var/lib/kubelet/plugins/unidra.dev/dra.sock; stop it "
        "first (only a rolling upgrade runs two instances, each with its own POD_UID)"
    )
    owner.release(remove=True)
    instances.claim_instance(tmp_path, None, record(pid=7)).release(remove=True)
    assert list(tmp_path.iterdir()) == []


def test_pod_uids_coexist_but_an_instance_without_one_wants_the_node_alone(
    tmp_path: Path,
) -> None:
    old = instances.claim_instance(tmp_path, OLD, record(OLD))
    new = instances.claim_instance(tmp_path, NEW, record(NEW, pid=5))
    with pytest.raises(FatalError, match=f"pod UID {OLD}"):
        instances.claim_instance(tmp_path, OLD, record(OLD, pid=6))
    with pytest.raises(FatalError, match="another Unidra instance runs on this node: pid"):
        instances.claim_instance(tmp_path, None, record(pid=6))
    assert not (tmp_path / "instance.lock").exists()  # the refused one left nothing behind
    old.release(remove=True)
    new.release(remove=True)


def test_the_lock_of_a_killed_instance_is_free_and_its_file_is_swept(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from driver import instances; "
            f"from driver.instances import InstanceRecord; "
            f"instances.claim_instance(Path({str(tmp_path)!r}), {OLD!r}, "
            f"InstanceRecord(1, 'now', 'h', {OLD!r}, ())); print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    with pytest.raises(FatalError, match="pid 1 on host h"):
        instances.claim_instance(tmp_path, None, record())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    owner = instances.claim_instance(tmp_path, None, record())  # the kernel dropped its lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instance.lock"]
    owner.release(remove=True)


def test_the_publisher_lease_goes_to_one_holder_at_a_time(tmp_path: Path) -> None:
    first, second = instances.publisher_lease(tmp_path), instances.publisher_lease(tmp_path)
    assert first.try_acquire(record(OLD))
    assert not second.try_acquire(record(NEW), wait=0.05)
    assert second.holder() == record(OLD)
    first.release()
    assert second.try_acquire(record(NEW))
    assert first.holder() == record(NEW)
    second.release()


def test_a_lock_file_removed_under_a_contender_is_not_shared(tmp_path: Path) -> None:
    """A holder that removes its file as it lets go must not leave two holders behind."""
    path = tmp_path / "instance.lock"
    first = Lease(path)
    assert first.try_acquire(record())
    first.release(remove=True)
    second, third = Lease(path), Lease(path)
    assert second.try_acquire(record(pid=2))
    assert not third.try_acquire(record(pid=3))
    second.release()
