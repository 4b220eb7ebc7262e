"""OBSERVE: vendor health events become device conditions, taints and notifications, with hysteresis.

Every backend reports `HealthEvent`s in one vocabulary of kinds. The policy maps each kind to a
taint effect; the board keeps the active conditions of every device and derives one taint per
unhealthy device, `<driver>/unhealthy=<reason>`. Conditions clear when the device proves healthy
again: a recovery signal for persistent faults (lost, uncorrectable ECC), or a quiet period for
transient ones (Xid, overheating). A device that keeps failing right after recovering waits
longer each time (exponential hold-down), so a flapping device does not thrash the slices.
`snapshot` and `restore` carry the conditions and their hold times over to the next instance.
"""

from __future__ import annotations

import copy
import enum
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from driver.errors import ConfigError
from driver.model import HealthEvent, HealthStatus

log = logging.getLogger(__name__)


class Effect(enum.StrEnum):
    NO_SCHEDULE = "NoSchedule"
    NO_EXECUTE = "NoExecute"
    NONE = "None"  # recorded in the slice, changes no scheduling (Kubernetes 1.35+)


# What each kind of fault does by default; docs/health.md has the table and the reasons.
DEFAULT_POLICY: Mapping[str, Effect] = {
    "lost": Effect.NO_EXECUTE,
    "ecc-uncorrectable": Effect.NO_EXECUTE,
    "row-remap-failure": Effect.NO_SCHEDULE,
    "xid": Effect.NO_SCHEDULE,
    "device-status": Effect.NO_SCHEDULE,
    "overheating": Effect.NO_SCHEDULE,
}
# Faults that pass by themselves: cleared after a quiet period without new faults.
TRANSIENT = frozenset({"xid", "overheating"})
# Informational kinds: counted and logged, never a condition.
INFORMATIONAL = frozenset({"application-error", "unmonitored"})
# Every kind a backend may report: the vocabulary of docs/health.md.
KINDS = frozenset(DEFAULT_POLICY) | INFORMATIONAL | {"recovered"}
_RANK = {Effect.NO_EXECUTE: 2, Effect.NO_SCHEDULE: 1, Effect.NONE: 0}
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")


def parse_policy(overrides: Mapping[str, str]) -> dict[str, Effect | None]:
    """The default policy with `kind=Effect` overrides; `off` disables tainting for a kind."""
    policy: dict[str, Effect | None] = dict(DEFAULT_POLICY)
    for kind, value in overrides.items():
        if value.lower() == "off":
            policy[kind] = None
            continue
        try:
            policy[kind] = Effect(value)
        except ValueError:
            allowed = ", ".join(e.value for e in Effect)
            raise ConfigError(
                "--taint-effect", f"{kind}={value}: the effect must be one of {allowed} or off"
            ) from None
    return policy


@dataclass
class Condition:
    kind: str
    code: str
    message: str
    effect: Effect | None
    raised: float
    clear_after: float | None = None  # a recovery signal arrived; clears once the hold is over


@dataclass
class DeviceState:
    conditions: dict[str, Condition] = field(default_factory=dict)
    last_fault: float = 0.0
    last_recovery: float = -1e18
    flaps: int = 0
    updated: float = field(default_factory=time.time)


class HealthBoard:
    """The health of every device; thread-safe. Subscribers are called (without the lock) on changes."""

    def __init__(
        self,
        *,
        taint_key: str,
        policy: Mapping[str, Effect | None] = DEFAULT_POLICY,
        quiet_seconds: float = 300.0,
        min_hold_seconds: float = 30.0,
        flap_window_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.taint_key = taint_key
        self.policy = dict(policy)
        self.quiet_seconds = quiet_seconds
        self.min_hold_seconds = min_hold_seconds
        self.flap_window_seconds = flap_window_seconds
        self.clock = clock
        self.monitored: set[str] = set()
        self._unwatched: dict[str, str] = {}  # device -> why its backend cannot watch it
        self._states: dict[str, DeviceState] = {}
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[], None]] = []
        self.events_seen: dict[str, int] = {}

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._subscribers.append(callback)

    def report(self, event: HealthEvent) -> bool:
        """Apply one event; returns whether any device's health changed."""
        with self._lock:
            self.events_seen[event.kind] = self.events_seen.get(event.kind, 0) + 1
            changed = self._apply(event)
        if changed:
            self._notify()
        return changed

    def tick(self) -> bool:
        """Clear conditions whose quiet period or hold is over; returns whether anything changed."""
        now = self.clock()
        changed = False
        with self._lock:
            for name, state in self._states.items():
                had = set(state.conditions)
                if self._clear_due(state, now):
                    changed = True
                    log.info(
                        "Device condition cleared",
                        extra={"device": name, "cleared": sorted(had - set(state.conditions))},
                    )
        if changed:
            self._notify()
        return changed

    def next_deadline(self) -> float | None:
        """When `tick` may next clear something (monotonic clock), or None."""
        with self._lock:
            deadlines = [
                self._deadline(state, condition)
                for state in self._states.values()
                for condition in state.conditions.values()
            ]
        known = [d for d in deadlines if d is not None]
        return min(known) if known else None

    def status(self, device: str) -> tuple[HealthStatus, str]:
        with self._lock:
            state = self._states.get(device)
            if state is not None and state.conditions:
                worst = max(
                    state.conditions.values(), key=lambda c: _RANK.get(c.effect or Effect.NONE, 0)
                )
                return HealthStatus.UNHEALTHY, worst.message or worst.kind
            unwatched = self._unwatched.get(device)
        if unwatched is not None:
            return HealthStatus.UNKNOWN, unwatched
        if device not in self.monitored:
            return HealthStatus.UNKNOWN, "no health signal for this device"
        return HealthStatus.HEALTHY, ""

    def worst_effect(self, device: str) -> Effect | None:
        """The most severe effect among the device's active conditions; None when it has none."""
        with self._lock:
            state = self._states.get(device)
            effects = [c.effect for c in state.conditions.values() if c.effect] if state else []
        return max(effects, key=_RANK.__getitem__) if effects else None

    def hold_left(self, device: str) -> float:
        """Seconds until every active condition of the device is past its minimum hold."""
        now = self.clock()
        with self._lock:
            state = self._states.get(device)
            ends = (
                [c.raised + self.min_hold_seconds for c in state.conditions.values()]
                if state
                else []
            )
        return max([0.0, *(end - now for end in ends)])

    def updated(self, device: str) -> float:
        with self._lock:
            state = self._states.get(device)
            return state.updated if state else 0.0

    def taints(self) -> dict[str, list[dict[str, Any]]]:
        """One taint per device with a tainting condition: the most severe effect, its reason as value."""
        result = {}
        with self._lock:
            for name, state in self._states.items():
                tainting = [c for c in state.conditions.values() if c.effect is not None]
                if not tainting:
                    continue
                worst = max(tainting, key=lambda c: _RANK[c.effect or Effect.NONE])
                result[name] = [
                    {"key": self.taint_key, "value": reason(worst), "effect": str(worst.effect)}
                ]
        return result

    def snapshot(self) -> dict[str, DeviceState]:
        """A copy of every device state worth keeping: active conditions or a flapping history.

        Times are on the board's clock (monotonic by default: the same clock for every process
        of one boot, which is why the saved state is tagged with the boot ID).
        """
        with self._lock:
            return {
                name: copy.deepcopy(state)
                for name, state in self._states.items()
                if state.conditions or state.flaps
            }

    def restore(self, saved: Mapping[str, DeviceState]) -> int:
        """Adopt conditions another instance held (or this one before a restart) that are not
        active here; flap history takes the longer of both. Effects follow this board's policy.
        Returns how many conditions were adopted; subscribers hear of them."""
        adopted: dict[str, list[str]] = {}
        with self._lock:
            for name, other in saved.items():
                state = self._states.setdefault(name, DeviceState())
                state.flaps = max(state.flaps, other.flaps)
                state.last_fault = max(state.last_fault, other.last_fault)
                state.last_recovery = max(state.last_recovery, other.last_recovery)
                for kind, condition in other.conditions.items():
                    if kind in state.conditions:
                        continue
                    state.conditions[kind] = Condition(
                        kind,
                        condition.code,
                        condition.message,
                        self._effect(kind),
                        condition.raised,
                        condition.clear_after,
                    )
                    adopted.setdefault(name, []).append(kind)
                if name in adopted:
                    state.updated = max(state.updated, other.updated)
                    # Holds that ended while no instance ran are over now.
                    self._clear_due(state, self.clock())
                    adopted[name] = [k for k in adopted[name] if k in state.conditions]
                    if not adopted[name]:
                        del adopted[name]
        if adopted:
            log.warning("Device conditions carried over", extra={"devices": adopted})
            self._notify()
        return sum(len(kinds) for kinds in adopted.values())

    def unhealthy(self) -> dict[str, list[str]]:
        with self._lock:
            return {name: sorted(s.conditions) for name, s in self._states.items() if s.conditions}

    def _apply(self, event: HealthEvent) -> bool:
        now = self.clock()
        if event.kind == "unmonitored":
            changed = event.device not in self._unwatched
            self._unwatched[event.device] = event.message or "its backend cannot watch it"
            return changed
        if event.kind in INFORMATIONAL:
            return False
        state = self._states.setdefault(event.device, DeviceState())
        if event.healthy:
            kinds = list(state.conditions) if event.kind == "recovered" else [event.kind]
            pending = False
            for kind in kinds:
                condition = state.conditions.get(kind)
                if condition is not None and condition.clear_after is None:
                    condition.clear_after = condition.raised + self.min_hold_seconds
                    pending = True
            return pending and self._clear_due(state, now)
        if event.kind not in self.policy and event.kind not in TRANSIENT:
            log.warning(
                "Unknown health event kind; tainting with NoSchedule", extra={"kind": event.kind}
            )
        effect = self._effect(event.kind)
        if not state.conditions:
            # Failing again soon after recovering waits longer next time; a long healthy spell forgives.
            recent = now - state.last_recovery < self.flap_window_seconds
            state.flaps = state.flaps + 1 if recent else 0
        state.last_fault = now
        existing = state.conditions.get(event.kind)
        state.conditions[event.kind] = Condition(event.kind, event.code, event.message, effect, now)
        if existing is not None and existing.code == event.code and existing.clear_after is None:
            return False
        state.updated = time.time()
        log.warning(
            "Device unhealthy",
            extra={
                "device": event.device,
                "kind": event.kind,
                "code": event.code,
                "effect": str(effect),
            },
        )
        return True

    def _effect(self, kind: str) -> Effect | None:
        return self.policy.get(kind, Effect.NO_SCHEDULE)

    def _clear_due(self, state: DeviceState, now: float) -> bool:
        changed = False
        for kind, condition in list(state.conditions.items()):
            if self._expired(state, condition, now):
                del state.conditions[kind]
                changed = True
        if changed:
            state.updated = time.time()
            if not state.conditions:
                state.last_recovery = now
        return changed

    def _deadline(self, state: DeviceState, condition: Condition) -> float | None:
        if condition.clear_after is not None:
            return condition.clear_after
        if condition.kind in TRANSIENT:
            hold: float = self.quiet_seconds * 2 ** min(state.flaps, 4)
            return state.last_fault + hold
        return None

    def _expired(self, state: DeviceState, condition: Condition, now: float) -> bool:
        deadline = self._deadline(state, condition)
        return deadline is not None and now >= deadline

    def _notify(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                log.exception("Health subscriber failed")


def reason(condition: Condition) -> str:
    """A label-value-safe reason: `lost`, `xid-119`, `ecc-uncorrectable-dbe`."""
    text = (
        f"{condition.kind}-{condition.code}"
        if condition.code and condition.code != condition.kind
        else condition.kind
    )
    return _LABEL_VALUE.sub("-", text).strip("-._")[:63]
