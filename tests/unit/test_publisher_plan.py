"""The publish planner: fewest writes, in-place updates, generation bumps, obsolete slices; and
the pool's write limit."""

from __future__ import annotations

from driver.publisher import TokenBucket, comparable, plan
from driver.slices import SliceContent


def device(name: str, memory: str = "80Gi") -> dict:
    return {"name": name, "attributes": {}, "capacity": {"memory": {"value": memory}}}


def content(*names: str) -> SliceContent:
    return SliceContent(devices=tuple(device(n) for n in names))


def existing(name: str, generation: int, count: int, *devices: str) -> dict:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "1"},
        "spec": {
            "pool": {"generation": generation, "resourceSliceCount": count},
            "devices": [device(d) for d in devices],
        },
    }


def same(item: dict, wanted: SliceContent, generation: int, count: int) -> bool:
    pool = item["spec"]["pool"]
    return (
        pool["generation"] == generation
        and pool["resourceSliceCount"] == count
        and comparable(item["spec"])["devices"] == comparable(wanted.spec_fields())["devices"]
    )


def test_first_publish_creates_at_generation_one() -> None:
    result = plan([], [content("a"), content("b")], same)
    assert (result.generation, result.count, len(result.creates), result.writes) == (1, 2, 2, 2)


def test_nothing_changed_means_no_writes() -> None:
    result = plan(
        [existing("s1", 3, 2, "a"), existing("s2", 3, 2, "b")], [content("a"), content("b")], same
    )
    assert result.writes == 0 and result.generation == 3


def test_one_changed_slice_is_updated_in_place() -> None:
    desired = [content("a"), SliceContent(devices=(device("b", "40Gi"),))]
    result = plan([existing("s1", 3, 2, "a"), existing("s2", 3, 2, "b")], desired, same)
    assert result.generation == 3
    assert [item["metadata"]["name"] for item, _ in result.updates] == ["s2"]
    assert not result.creates and not result.deletes


def test_quantities_compare_by_value_not_spelling() -> None:
    item = existing("s1", 1, 1, "a")
    item["spec"]["devices"][0]["capacity"]["memory"]["value"] = "85899345920"
    assert plan([item], [content("a")], same).writes == 0


def test_two_changed_slices_bump_the_generation_everywhere() -> None:
    desired = [SliceContent(devices=(device("a", "1"),)), SliceContent(devices=(device("b", "1"),))]
    result = plan([existing("s1", 3, 2, "a"), existing("s2", 3, 2, "b")], desired, same)
    assert result.generation == 4 and len(result.updates) == 2


def test_relayout_creates_updates_and_deletes_at_a_new_generation() -> None:
    result = plan([existing("s1", 1, 1, "a", "b")], [content("a"), content("b")], same)
    assert result.generation == 2
    assert len(result.creates) == 2 and [d["metadata"]["name"] for d in result.deletes] == ["s1"]


def test_obsolete_generations_are_deleted() -> None:
    result = plan([existing("old", 1, 1, "a"), existing("new", 2, 1, "a")], [content("a")], same)
    assert [d["metadata"]["name"] for d in result.deletes] == ["old"] and not result.updates


def test_generations_are_never_reused_after_a_wipe() -> None:
    assert plan([], [content("a")], same, highest_written=7).generation == 8


def test_the_write_limit_allows_a_burst_then_a_steady_trickle() -> None:
    now = [100.0]
    bucket = TokenBucket(burst=3, per_second=0.5, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait() == 2.0
    now[0] += 1.0
    assert not bucket.take() and bucket.wait() == 1.0
    now[0] += 1.0
    assert bucket.take() and not bucket.take()
    now[0] += 3600  # a quiet hour refills the burst, no more
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
