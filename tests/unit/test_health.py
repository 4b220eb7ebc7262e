"""The health board: policy, taints, recovery by signal or quiet period, minimum hold, flapping hold-down."""

from __future__ import annotations

import pytest

from driver.errors import ConfigError
from driver.health import Effect, HealthBoard, parse_policy
from driver.model import HealthEvent, HealthStatus


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def board(clock: Clock, **options: float) -> HealthBoard:
    values = {"quiet_seconds": 300.0, "min_hold_seconds": 30.0, "flap_window_seconds": 3600.0}
    values.update(options)
    health = HealthBoard(taint_key="unidra.dev/unhealthy", clock=clock, **values)
    health.monitored = {"gpu-a", "gpu-b"}
    return health


@pytest.mark.parametrize(
    ("event", "effect", "value"),
    [
        (HealthEvent("gpu-a", "lost", "79"), "NoExecute", "lost-79"),
        (HealthEvent("gpu-a", "ecc-uncorrectable", "dbe"), "NoExecute", "ecc-uncorrectable-dbe"),
        (HealthEvent("gpu-a", "xid", "119"), "NoSchedule", "xid-119"),
        (HealthEvent("gpu-a", "overheating", "thermal"), "NoSchedule", "overheating-thermal"),
        (
            HealthEvent("gpu-a", "device-status", "Needs Reset"),
            "NoSchedule",
            "device-status-Needs-Reset",
        ),
    ],
)
def test_policy_turns_events_into_one_taint(event: HealthEvent, effect: str, value: str) -> None:
    health = board(Clock())
    assert health.report(event)
    assert health.taints() == {
        "gpu-a": [{"key": "unidra.dev/unhealthy", "value": value, "effect": effect}]
    }
    assert health.status("gpu-a")[0] is HealthStatus.UNHEALTHY


def test_application_errors_change_nothing() -> None:
    health = board(Clock())
    assert not health.report(HealthEvent("gpu-a", "application-error", "13", healthy=True))
    assert health.taints() == {} and health.status("gpu-a") == (HealthStatus.HEALTHY, "")
    assert health.events_seen == {"application-error": 1}


def test_the_most_severe_condition_wins() -> None:
    health = board(Clock())
    health.report(HealthEvent("gpu-a", "xid", "119"))
    health.report(HealthEvent("gpu-a", "lost", "79"))
    assert health.taints()["gpu-a"][0]["effect"] == "NoExecute"


def test_transient_faults_clear_after_a_quiet_period() -> None:
    clock = Clock()
    health = board(clock)
    health.report(HealthEvent("gpu-a", "xid", "119"))
    clock.now += 299
    assert not health.tick() and health.taints()
    clock.now += 2
    assert health.tick() and health.taints() == {}


def test_a_new_fault_restarts_the_quiet_period() -> None:
    clock = Clock()
    health = board(clock)
    health.report(HealthEvent("gpu-a", "xid", "119"))
    clock.now += 200
    health.report(HealthEvent("gpu-a", "xid", "119"))
    clock.now += 200
    assert not health.tick()
    clock.now += 101
    assert health.tick()


def test_persistent_faults_need_a_recovery_signal_and_respect_the_minimum_hold() -> None:
    clock = Clock()
    health = board(clock)
    health.report(HealthEvent("gpu-a", "lost", "79"))
    clock.now += 10_000
    assert not health.tick() and health.taints()  # a lost GPU does not heal by waiting
    health.report(HealthEvent("gpu-a", "lost", healthy=True))
    assert health.taints() == {}  # raised long ago: the hold is over, cleared at once
    health.report(HealthEvent("gpu-a", "lost", "79"))
    health.report(HealthEvent("gpu-a", "lost", healthy=True))
    assert health.taints()  # recovered right after failing: held for the minimum time
    assert health.next_deadline() == clock.now + 30
    clock.now += 30
    assert health.tick() and health.taints() == {}


def test_recovered_clears_every_condition() -> None:
    clock = Clock()
    health = board(clock, min_hold_seconds=0)
    health.report(HealthEvent("gpu-a", "lost"))
    health.report(HealthEvent("gpu-a", "ecc-uncorrectable", "dbe"))
    health.report(HealthEvent("gpu-a", "recovered", healthy=True))
    assert health.taints() == {} and health.status("gpu-a")[0] is HealthStatus.HEALTHY


def test_a_flapping_device_waits_longer_each_time() -> None:
    clock = Clock()
    health = board(clock)
    waits = []
    for _ in range(4):
        health.report(HealthEvent("gpu-a", "xid", "62"))
        started = clock.now
        while not health.tick():
            clock.now += 50
        waits.append(clock.now - started)
        clock.now += 60  # fails again a minute after recovering
    assert waits == [300, 600, 1200, 2400]
    clock.now += 3600  # a healthy hour: the next fault is forgiven the history
    health.report(HealthEvent("gpu-a", "xid", "62"))
    assert health.next_deadline() == clock.now + 300


def test_unmonitored_devices_are_unknown_not_healthy() -> None:
    assert board(Clock()).status("tpu-x")[0] is HealthStatus.UNKNOWN


def test_devices_their_backend_cannot_watch_are_unknown() -> None:
    health = board(Clock())
    health.report(HealthEvent("gpu-a", "unmonitored", message="NVML cannot deliver events"))
    assert health.status("gpu-a") == (HealthStatus.UNKNOWN, "NVML cannot deliver events")
    assert health.status("gpu-b")[0] is HealthStatus.HEALTHY


def test_subscribers_hear_changes_only() -> None:
    health = board(Clock())
    calls = []
    health.subscribe(lambda: calls.append(1))
    health.report(HealthEvent("gpu-a", "xid", "119"))
    health.report(HealthEvent("gpu-a", "xid", "119"))  # the same condition again: no change
    assert calls == [1]


def test_policy_overrides() -> None:
    policy = parse_policy({"xid": "NoExecute", "overheating": "off", "custom": "None"})
    assert (
        policy["xid"] is Effect.NO_EXECUTE
        and policy["overheating"] is None
        and policy["custom"] is Effect.NONE
    )
    health = HealthBoard(taint_key="k/u", policy=policy, clock=Clock())
    health.report(HealthEvent("gpu-a", "overheating"))
    assert health.taints() == {} and health.status("gpu-a")[0] is HealthStatus.UNHEALTHY
    with pytest.raises(
        ConfigError,
        match=r"xid=Evict: the effect must be one of NoSchedule, NoExecute, None or off",
    ):
        parse_policy({"xid": "Evict"})


def test_snapshot_and_restore_carry_conditions_and_hold_times_over() -> None:
    clock = Clock()
    old = board(clock)
    old.report(HealthEvent("gpu-a", "xid", "79", "fell off"))
    old.report(HealthEvent("gpu-b", "lost", "", "gone"))
    deadline = old.next_deadline()
    clock.now += 100
    new = board(clock, quiet_seconds=300.0)
    heard: list[int] = []
    new.subscribe(lambda: heard.append(1))
    assert new.restore(old.snapshot()) == 2
    assert heard == [1]
    assert new.taints() == old.taints()
    assert new.next_deadline() == deadline  # the quiet period runs on, it does not restart
    assert new.restore(old.snapshot()) == 0  # already there: nothing adopted, nobody told
    assert heard == [1]
    clock.now = deadline
    new.tick()
    assert set(new.unhealthy()) == {"gpu-b"}


def test_restore_applies_the_new_policy_and_drops_holds_that_ended_meanwhile() -> None:
    clock = Clock()
    old = board(clock)
    old.report(HealthEvent("gpu-a", "lost", ""))
    old.report(HealthEvent("gpu-b", "xid", "13"))
    clock.now += 10_000  # the xid's quiet period ended while no instance ran
    new = HealthBoard(
        taint_key="unidra.dev/unhealthy",
        policy=parse_policy({"lost": "NoSchedule"}),
        clock=clock,
    )
    assert new.restore(old.snapshot()) == 1
    assert new.taints() == {
        "gpu-a": [{"key": "unidra.dev/unhealthy", "value": "lost", "effect": "NoSchedule"}]
    }
