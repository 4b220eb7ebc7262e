"""Checkpoint encoding: round trip, checksum, version, and change detection across writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driver import checkpoint
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
