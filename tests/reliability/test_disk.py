"""Damage on disk between runs: the checkpoint or a CDI spec truncated, emptied, overwritten with
garbage, edited, or gone. The daemon starts anyway, says what it found, rebuilds what it can,
and every claim can still be unprepared and prepared again. Two of the claims are shares of one
GPU: a rebuilt share keeps its share ID; rebuilt from CDI specs alone it holds its whole device
until it is unprepared, because what it consumed is lost with the checkpoint and its copy."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pytest

from driver import cdi
from driver.demo.apiserver import ApiServer as FakeApiServer
from support.claims import allocated_claim, result, share
from support.processes import checkpoint_claims
from support.reliability import TALLY

GPUS = ["gpu-0000-1b-00-0", "gpu-0000-43-00-0", "gpu-0000-52-00-0"]
SHARED = "gpu-0000-61-00-0"
Damage = Callable[[bytes], bytes]

DAMAGE: dict[str, Damage] = {
    "truncated to half": lambda data: data[: len(data) // 2],
    "truncated to one byte": lambda data: data[:1],
    "emptied": lambda data: b"",
    "garbage": lambda data: bytes(random.Random(7).randrange(256) for _ in range(len(data))),
    "one byte flipped": lambda data: data[:40] + bytes([data[40] ^ 0x20]) + data[41:],
    "not an object": lambda data: b"[1, 2, 3]\n",
}


def prepared_node(node, api: FakeApiServer) -> list[tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    claims = [
        allocated_claim(api, f"kept-{i}", [result(gpu, "node-a")]) for i, gpu in enumerate(GPUS)
    ]
    claims += [
        allocated_claim(api, f"share-{i}", [share(SHARED, "node-a", "30Gi")]) for i in (0, 1)
    ]
    with node.serve(sharing=True) as (_, plugin):
        for claim in claims:
            assert plugin.prepare([claim])[claim[2]].error == ""
    return claims


def all_claims_still_work(node, claims, expect_recorded: bool = True) -> None:  # type: ignore[no-untyped-def]
    with node.serve(sharing=True) as (_, plugin):
        if expect_recorded:
            assert set(checkpoint_claims(node)) == {c[2] for c in claims}
        for claim in claims:
            assert plugin.unprepare([claim])[claim[2]].error == ""
        assert checkpoint_claims(node) == {}
        assert cdi.claim_specs(node.cdi_root, "unidra.dev") == {}
        for claim in claims:
            assert plugin.prepare([claim])[claim[2]].error == ""


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
@pytest.mark.parametrize("copy", ["copy intact", "copy damaged"])
def test_a_damaged_checkpoint_comes_back_from_its_durable_copy_or_the_cdi_specs(
    node, api: FakeApiServer, caplog: pytest.LogCaptureFixture, damage: str, copy: str
) -> None:  # type: ignore[no-untyped-def]
    claims = prepared_node(node, api)
    path = node.plugin_dir / "checkpoint.json"
    good = checkpoint_claims(node)
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    slots = path.with_suffix(".slots")
    if copy == "copy damaged":  # the same way, or gone (an older Unidra keeps none)
        if damage == "emptied":
            slots.unlink()
        else:
            slots.write_bytes(DAMAGE[damage](slots.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="driver.prepare"), node.serve(sharing=True):
        if copy == "copy intact":
            assert checkpoint_claims(node) == good  # request names and all
    if copy == "copy intact":
        assert "Checkpoint restored from its durable copy" in caplog.text
        TALLY["disk: damaged checkpoints restored from checkpoint.slots"] += 1
    else:
        assert "Checkpoint is corrupt; moved aside and rebuilt from CDI specs" in caplog.text
        assert list(node.plugin_dir.glob("checkpoint.json.corrupt-*"))
        TALLY["disk: damaged checkpoints rebuilt from CDI specs"] += 1
    all_claims_still_work(node, claims)
    # Every claim was prepared again, the two shares of one GPU included.
    assert {d.device for c in checkpoint_claims(node).values() for d in c.devices} >= {SHARED}


def test_a_lost_checkpoint_with_a_damaged_copy_is_rebuilt_not_taken_for_empty(
    node, api: FakeApiServer, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    claims = prepared_node(node, api)
    (node.plugin_dir / "checkpoint.json").unlink()
    slots = node.plugin_dir / "checkpoint.slots"
    data = bytearray(slots.read_bytes())
    data[len(data) // 2 + 30] ^= 1  # one slot damaged: which version was newest is unknown
    slots.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="driver.prepare"), node.serve(sharing=True):
        # Every claim is still recorded and its spec kept: none was taken for an orphan.
        assert set(checkpoint_claims(node)) == {c[2] for c in claims}
        assert set(cdi.claim_specs(node.cdi_root, "unidra.dev")) == {c[2] for c in claims}
    assert "Checkpoint is lost; rebuilt from CDI specs" in caplog.text
    all_claims_still_work(node, claims)
    TALLY["disk: lost checkpoints with a damaged copy rebuilt from CDI specs"] += 1


@pytest.mark.parametrize("damage", [*DAMAGE, "deleted"], ids=[*DAMAGE, "deleted"])
def test_a_damaged_or_missing_cdi_spec_is_rewritten(
    node, api: FakeApiServer, caplog: pytest.LogCaptureFixture, damage: str
) -> None:  # type: ignore[no-untyped-def]
    claims = prepared_node(node, api)
    spec = cdi.spec_path(node.cdi_root, "unidra.dev", claims[1][2])
    good = spec.read_bytes()
    if damage == "deleted":  # /var/run is a tmpfs: a reboot empties it
        spec.unlink()
    else:
        spec.write_bytes(DAMAGE[damage](good))
    with caplog.at_level(logging.WARNING, logger="driver.prepare"), node.serve(sharing=True):
        assert spec.read_bytes() == good
    assert "Rewrote missing or stale CDI specs of prepared claims" in caplog.text
    all_claims_still_work(node, claims)
    TALLY["disk: damaged or missing CDI specs rewritten"] += 1


def test_checkpoint_and_a_spec_both_damaged(node, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    claims = prepared_node(node, api)
    (node.plugin_dir / "checkpoint.json").write_bytes(b"\x00garbage")
    (node.plugin_dir / "checkpoint.slots").write_bytes(b"\x00garbage")
    cdi.spec_path(node.cdi_root, "unidra.dev", claims[0][2]).write_bytes(b"{not json")
    with node.serve(sharing=True) as (_, plugin):
        # The unreadable spec cannot say which devices it held: it is dropped, not guessed.
        assert set(checkpoint_claims(node)) == {c[2] for c in claims[1:]}
        assert set(cdi.claim_specs(node.cdi_root, "unidra.dev")) == {c[2] for c in claims[1:]}
        # Unprepared first: a rebuilt share holds its whole GPU until then.
        for claim in claims:
            assert plugin.unprepare([claim])[claim[2]].error == ""
        for claim in claims:
            assert plugin.prepare([claim])[claim[2]].error == ""
    TALLY["disk: checkpoint and a spec damaged together"] += 1


def test_temporary_files_of_an_interrupted_write_are_removed(node, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    claims = prepared_node(node, api)
    leftovers = [
        node.plugin_dir / ".checkpoint.json.abc123.tmp",
        node.plugin_dir / ".checkpoint.slots.def456.tmp",  # the copy grown by a rewrite
        node.cdi_root / f".{cdi.spec_filename('unidra.dev', claims[0][2])}.xyz789.tmp",
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"half a wri")
    all_claims_still_work(node, claims)
    assert not any(leftover.exists() for leftover in leftovers)
    TALLY["disk: interrupted temporary files cleaned"] += 1


@pytest.mark.parametrize("copy", ["copy intact", "copy damaged"])
def test_a_rebuilt_share_keeps_its_id_and_what_it_consumed_survives_only_in_the_copy(
    node, api: FakeApiServer, copy: str
) -> None:  # type: ignore[no-untyped-def]
    claims = prepared_node(node, api)
    before = checkpoint_claims(node)
    (node.plugin_dir / "checkpoint.json").write_bytes(b"garbage")
    if copy == "copy damaged":
        (node.plugin_dir / "checkpoint.slots").write_bytes(b"garbage")
    late = allocated_claim(api, "late", [share(SHARED, "node-a", "1Gi")])
    with node.serve(sharing=True) as (_, plugin):
        rebuilt = checkpoint_claims(node)
        for claim in claims[-2:]:
            assert [d.share_id for d in rebuilt[claim[2]].devices] == [
                d.share_id for d in before[claim[2]].devices
            ]
            assert [d.cdi_ids for d in rebuilt[claim[2]].devices] == [
                d.cdi_ids for d in before[claim[2]].devices
            ]
        if copy == "copy intact":
            # The durable copy records what each share consumed: 60 of 80 GiB taken, 1 GiB fits.
            assert plugin.prepare([late])[late[2]].error == ""
            assert plugin.unprepare([late])[late[2]].error == ""
        else:
            # Rebuilt from CDI specs, what they consumed is lost: they hold the whole GPU
            # until they are unprepared.
            assert "would use" in plugin.prepare([late])[late[2]].error
        assert all(plugin.unprepare([c])[c[2]].error == "" for c in claims[-2:])
        assert plugin.prepare([late])[late[2]].error == ""
    TALLY[f"disk: rebuilt shares kept, {copy}"] += 1
