"""durable.Slots: versions alternate between two slots; a torn slot leaves the previous version."""

from __future__ import annotations

from pathlib import Path

from driver.durable import Slots


def test_versions_alternate_and_the_newest_wins(tmp_path: Path) -> None:
    slots = Slots(tmp_path / "x.slots")
    assert slots.newest() is None and slots.versions() == ([], False)
    for generation in (1, 2, 3):
        slots.write(generation, f"v{generation}".encode())
    assert slots.newest() == (3, b"v3")
    assert sorted(slots.versions()[0]) == [(2, b"v2"), (3, b"v3")]
    assert (tmp_path / "x.slots").stat().st_size == 2 * Slots.MINIMUM


def test_a_torn_write_leaves_the_previous_version_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "x.slots"
    slots = Slots(path)
    slots.write(4, b"four")
    slots.write(5, b"five")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + Slots.HEADER.size] ^= 0xFF  # generation 5 is in the second slot
    path.write_bytes(bytes(data))
    assert slots.versions() == ([(4, b"four")], True)


def test_a_version_larger_than_a_slot_gets_a_larger_file(tmp_path: Path) -> None:
    slots = Slots(tmp_path / "x.slots")
    slots.write(1, b"small")
    big = b"b" * (Slots.MINIMUM + 1)
    slots.write(2, big)
    assert slots.newest() == (2, big)
    assert (tmp_path / "x.slots").stat().st_size >= 4 * len(big)
    slots.write(3, b"small again")
    assert slots.newest() == (3, b"small again")
