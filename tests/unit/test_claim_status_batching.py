"""Claim status writes are batched after a burst settles, but sustained prepares cannot starve them."""

from __future__ import annotations

import threading
import time
from typing import Any

from driver.claim_status import ClaimStatusWriter
from driver.claims import ClaimRef


def writer() -> ClaimStatusWriter:
    unused: Any = None
    return ClaimStatusWriter(
        api=unused, driver="unidra.dev", pool="node-a", store=unused, board=unused, inventory=unused
    )


def test_a_burst_is_written_once_per_claim() -> None:
    status = writer()
    for uid in ("a", "b", "a"):
        status.prepared(ClaimRef("default", uid, uid))
    batch = status._batch(threading.Event())
    assert sorted(batch) == ["a", "b"]


def test_sustained_prepares_do_not_starve_the_writes() -> None:
    status = writer()
    feeding = threading.Event()
    feeding.set()

    def feed() -> None:
        n = 0
        while feeding.is_set():
            status.prepared(ClaimRef("default", f"c{n}", f"c{n}"))
            n += 1
            time.sleep(0.01)  # always sooner than the settle time

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        result: dict[str, Any] = {}
        collector = threading.Thread(target=lambda: result.update(status._batch(threading.Event())))
        collector.start()
        collector.join(timeout=30)
        assert not collector.is_alive(), "the batch never closed while prepares kept coming"
        assert feeding.is_set() and result  # it closed while the feeder was still going
    finally:
        feeding.clear()
        feeder.join()


def test_a_claim_unprepared_before_its_status_was_written_costs_no_write() -> None:
    status = writer()
    status._current.add("written")  # its entries are in the API server: they must go
    for uid in ("brief", "written", "kept"):
        status.prepared(ClaimRef("default", uid, uid))
    for uid in ("brief", "written"):
        status.unprepared(ClaimRef("default", uid, uid))
    status.prepared(ClaimRef("default", "back", "back"))
    status.unprepared(ClaimRef("default", "back", "back"))
    status.prepared(ClaimRef("default", "back", "back"))  # prepared again: it is written
    assert sorted(status._batch(threading.Event())) == ["back", "kept", "written"]
