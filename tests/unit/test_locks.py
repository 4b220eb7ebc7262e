"""Claim and checkpoint locks exclude other threads and other processes, per key, with bounded waits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from driver.locks import FileLocks, LockTimeout

REPO = Path(__file__).resolve().parents[2]


def hold_in_subprocess(lock_file: Path, uid: str) -> subprocess.Popen[str]:
    """Another process holds the claim lock until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from driver.locks import FileLocks
        with FileLocks(Path({str(lock_file)!r})).claim({uid!r}):
            print("held", flush=True)
            sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_another_process_holding_a_claim_blocks_it_but_not_other_claims(tmp_path: Path) -> None:
    lock_file = tmp_path / "serialize.lock"
    holder = hold_in_subprocess(lock_file, "claim-a")
    locks = FileLocks(lock_file, timeout=0.3)
    try:
        with pytest.raises(LockTimeout, match="claim claim-a"), locks.claim("claim-a"):
            pass
        with locks.claim("claim-b"), locks.state():
            pass
        with locks.try_claim("claim-a") as free:
            assert free is False
    finally:
        holder.communicate(timeout=10)
    with locks.try_claim("claim-a") as free:
        assert free is True


def test_threads_of_one_process_are_serialized_per_claim(tmp_path: Path) -> None:
    locks = FileLocks(tmp_path / "serialize.lock")
    inside = 0
    peak = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, peak
        for _ in range(20):
            with locks.claim("same"):
                with guard:
                    inside += 1
                    peak = max(peak, inside)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 1


def test_lock_file_is_private(tmp_path: Path) -> None:
    FileLocks(tmp_path / "serialize.lock")
    assert oct((tmp_path / "serialize.lock").stat().st_mode & 0o777) == "0o600"
