"""Saved device health: kept across restarts of one boot, dropped after a reboot or damage."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from driver.health import HealthBoard
from driver.health_store import HealthStore
from driver.model import HealthEvent

BOOT, OTHER_BOOT = "5a08ef26-5920-460a-8dc5-da6e2bb69105", "0b8f1c77-1e2d-4a3b-9c4d-5e6f7a8b9c0d"


def unhealthy_board() -> HealthBoard:
    board = HealthBoard(taint_key="unidra.dev/unhealthy")
    board.report(HealthEvent("gpu-a", "lost", "", "fell off the bus"))
    board.report(HealthEvent("gpu-b", "xid", "79", "injected"))
    return board


def test_the_same_boot_gets_everything_back(tmp_path: Path) -> None:
    saved = unhealthy_board()
    assert HealthStore(tmp_path / "health.json", BOOT).save(saved.snapshot())
    assert (tmp_path / "health.json").stat().st_mode & 0o777 == 0o600
    board = HealthBoard(taint_key="unidra.dev/unhealthy")
    assert board.restore(HealthStore(tmp_path / "health.json", BOOT).load()) == 2
    assert board.taints() == saved.taints()
    assert board.next_deadline() == saved.next_deadline()


def test_a_reboot_starts_clean(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    HealthStore(tmp_path / "health.json", BOOT).save(unhealthy_board().snapshot())
    with caplog.at_level(logging.INFO, logger="driver.health_store"):
        assert HealthStore(tmp_path / "health.json", OTHER_BOOT).load() == {}
    assert "rebooted" in caplog.text
    assert HealthStore(tmp_path / "health.json", "").load() == {}  # unknown boot: no guessing


@pytest.mark.parametrize(
    "content", [b"", b"{", b"[]", b'{"kind": "HealthState", "apiVersion": "unidra.dev/v1"}']
)
def test_a_damaged_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    (tmp_path / "health.json").write_bytes(content)
    assert HealthStore(tmp_path / "health.json", BOOT).load() == {}
    assert "Ignoring the unreadable saved device health" in caplog.text


def test_a_refusing_disk_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = HealthStore(tmp_path / "missing-dir" / "health.json", BOOT)
    assert store.save(unhealthy_board().snapshot()) is False
    (record,) = [r for r in caplog.records if r.name == "driver.health_store"]
    assert record.getMessage() == "Cannot save device health"
    assert "missing-dir" in record.__dict__["error"] and record.exc_info is None
