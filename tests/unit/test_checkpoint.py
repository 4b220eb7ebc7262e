"""Checkpoint encoding: round trip, checksum, version, and change detection across writers."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from driver import checkpoint, durable
from driver.checkpoint import (
    Checkpoint,
    CheckpointCorrupt,
    CheckpointStore,
    PreparedClaim,
    PreparedDevice,
    decode,
    encode,
)
from driver.claims import Consumer
from driver.errors import StorageError
from driver.locks import FileLocks
from driver.model import Sharing, Strategy


def sample() -> Checkpoint:
    device = PreparedDevice(
        "gpu/big", "node", "gpu-a", ("k8s.d/claim=u-gpu-a",), False, None, {"env": {"A": "1"}}
    )
    claim = PreparedClaim("u", "ns", "c", (device,), (Consumer("pods", "p", "pu"),))
    return Checkpoint(boot_id="boot-1", claims={"u": claim})


def test_round_trip() -> None:
    assert decode(encode(sample())) == sample()


def shared() -> Checkpoint:
    device = PreparedDevice(
        "gpu",
        "node",
        "gpu-a",
        ("k8s.d/claim=u-gpu-a-3754b937-84d7-4c7e-8c8c-f8a1cc0301ec",),
        share_id="3754b937-84d7-4c7e-8c8c-f8a1cc0301ec",
        consumed={"memory": 30 << 30, "computeUnits": 38},
        sharing=Sharing(Strategy.TIME_SLICING, "", 0, 38, tuple(range(38))),
    )
    return Checkpoint(claims={"u": PreparedClaim("u", "ns", "c", (device,))})


def test_round_trip_of_a_share() -> None:
    assert decode(encode(shared())) == shared()


def test_a_checkpoint_from_before_sharing_still_reads() -> None:
    """An upgrade reads what the previous version wrote: no consumed capacity, no sharing."""
    body = json.loads(encode(sample()))
    for claim in body["claims"]:
        for device in claim["devices"]:
            del device["consumedCapacity"], device["sharing"]
    del body["checksum"]
    body["checksum"] = checkpoint._checksum(body)
    assert decode(json.dumps(body).encode()) == sample()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: text.replace('"gpu-a"', '"gpu-b"', 1), "checksum mismatch"),
        (
            lambda text: text.replace("unidra.dev/v1", "unidra.dev/v9"),
            "unsupported checkpoint unidra.dev/v9",
        ),
        (lambda text: "[]", "top level is not an object"),
    ],
    ids=["truncated", "edited", "newer-version", "wrong-shape"],
)
def test_damage_is_detected_with_a_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CheckpointCorrupt, match=reason):
        decode(mutate(encode(sample()).decode()).encode())


def test_store_sees_writes_of_another_instance(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    mine = CheckpointStore(path, FileLocks(tmp_path / "lock"))
    other = CheckpointStore(path, FileLocks(tmp_path / "lock"))
    assert mine.read().claims == {}
    with other.update() as checkpoint:
        checkpoint.claims.update(sample().claims)
    assert mine.read().claims == sample().claims
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_update_without_change_does_not_write(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoint.json", FileLocks(tmp_path / "lock"))
    with store.update():
        pass
    assert not (tmp_path / "checkpoint.json").exists()


def test_file_is_readable_json_for_operators(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoint.json", FileLocks(tmp_path / "lock"))
    store.write(sample())
    body = json.loads((tmp_path / "checkpoint.json").read_text())
    assert body["kind"] == "Checkpoint" and body["claims"][0]["devices"][0]["device"] == "gpu-a"


def test_a_version_outlives_a_lost_rename_in_its_durable_copy(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    store = CheckpointStore(path, FileLocks(tmp_path / "lock"))
    store.write(sample())  # the first write makes the file itself durable: no copy yet
    assert store.read().generation == 1 and not path.with_suffix(".slots").exists()
    first = path.read_bytes()
    with store.update() as checkpoint:
        checkpoint.claims.clear()
    assert store.read().generation == 2
    path.write_bytes(first)  # a power loss undid the last rename (it had no fsync)
    assert store.restore_from_slots() == "checkpoint.json is generation 1, the copy 2"
    assert store.read().claims == {} and store.read().generation == 2
    assert store.restore_from_slots() is None  # nothing newer now


def test_a_version_written_by_an_older_unidra_is_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    store = CheckpointStore(path, FileLocks(tmp_path / "lock"))
    for _ in range(3):
        with store.update() as checkpoint:
            checkpoint.boot_id += "x"
    # An older Unidra keeps no slots and writes no generation, durably.
    path.write_bytes(encode(Checkpoint(boot_id="older")))
    assert store.restore_from_slots() is None
    assert store.read().boot_id == "older" and store.read().generation == 0
    # The next write after it goes durably into the file, with a higher generation than the copy.
    with store.update() as checkpoint:
        checkpoint.boot_id = "newer"
    assert store.read().generation == 4


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_corrupt_file_comes_back_from_an_intact_copy(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "checkpoint.json"
    store = CheckpointStore(path, FileLocks(tmp_path / "lock"))
    for boot in ("a", "b", "c"):  # generation 1 in the file only, 2 and 3 in the slots
        with store.update() as checkpoint:
            checkpoint.boot_id = boot
    path.unlink() if damage == "missing" else path.write_bytes(b"{")
    assert store.restore_from_slots()
    assert store.read().boot_id == "c"
    # With the copy damaged too, its newest version may be lost: the file is left to recovery.
    slots = path.with_suffix(".slots")
    data = bytearray(slots.read_bytes())
    data[len(data) // 2 + 30] ^= 1  # generation 3 sits in the second slot
    slots.write_bytes(bytes(data))
    path.unlink() if damage == "missing" else path.write_bytes(b"{")
    assert store.restore_from_slots() is None


def test_concurrent_changes_share_one_write_and_fail_alone(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoint.json", FileLocks(tmp_path / "lock"))
    writes = []
    real_write = store.write

    def counted(checkpoint: Checkpoint) -> None:
        writes.append(len(checkpoint.claims))
        real_write(checkpoint)

    store.write = counted  # type: ignore[method-assign]
    claim = sample().claims["u"]
    started, release = threading.Event(), threading.Event()

    def slow(checkpoint: Checkpoint) -> None:  # holds the writer while the others queue up
        started.set()
        release.wait(5)

    def refused(checkpoint: Checkpoint) -> None:
        checkpoint.claims["half"] = claim
        raise ValueError("refused")

    first = threading.Thread(target=store.commit, args=(slow,))
    first.start()
    started.wait(5)
    outcomes: dict[str, object] = {}

    def submit(name: str, change: Callable[[Checkpoint], object]) -> None:
        try:
            outcomes[name] = store.commit(change)
        except ValueError as err:
            outcomes[name] = err

    others = [
        threading.Thread(
            target=submit, args=(f"c{n}", lambda c, n=n: c.claims.setdefault(f"c{n}", claim))
        )
        for n in range(4)
    ] + [threading.Thread(target=submit, args=("refused", refused))]
    for thread in others:
        thread.start()
    while len(store._queue) < len(others):
        time.sleep(0.001)
    release.set()
    for thread in (first, *others):
        thread.join(5)
    assert writes == [4]  # the four changes in one durable write; the slow one changed nothing
    assert sorted(store.read().claims) == ["c0", "c1", "c2", "c3"]  # "half" was undone
    assert isinstance(outcomes.pop("refused"), ValueError)
    assert list(outcomes.values()) == [claim] * 4


def test_an_older_unidra_reads_a_version_with_a_generation(tmp_path: Path) -> None:
    # What an older reader does (v1 without generations): pop the checksum, hash the canonical
    # rest, read bootID and claims; the generation is one more field under the checksum.
    data = encode(Checkpoint("boot", sample().claims, generation=7))
    body = json.loads(data)
    stored = body.pop("checksum")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert stored == "sha256:" + hashlib.sha256(canonical).hexdigest()
    assert body["generation"] == 7 and body["claims"][0]["uid"] == "u"
    # What it writes back has no generation: that reads as generation 0, an older writer.
    assert b"generation" not in encode(Checkpoint("boot", sample().claims))
    assert decode(encode(Checkpoint("boot", sample().claims))).generation == 0


def test_a_refusing_copy_makes_the_file_itself_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.json"
    store = CheckpointStore(path, FileLocks(tmp_path / "lock"))
    with store.update() as checkpoint:
        checkpoint.boot_id = "a"

    def refuse(generation: int, data: bytes) -> None:
        raise StorageError("cannot write checkpoint.slots: No space left on device")

    synced: list[Path] = []
    monkeypatch.setattr(store.slots, "write", refuse)
    monkeypatch.setattr(durable, "sync_file", synced.append)
    with store.update() as checkpoint:
        checkpoint.boot_id = "b"
    assert store.read().boot_id == "b" and synced == [path]
