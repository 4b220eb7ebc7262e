"""One sharing model for every vendor: which devices are shareable, what a share may use, and
whether the shares of a device still fit it; pure functions (docs/sharing.md).

A shareable device publishes `allowMultipleAllocations` with a request policy on each capacity,
so the scheduler hands out shares (KEP-5075), each with a shareID and its consumed capacity.
Here the driver turns a share and its claim's `sharing` config into the strategy and limits a
backend applies, and checks, as the last line of defence, that shares never exceed the device.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from driver import quantities
from driver.errors import ClaimError, ConfigError
from driver.model import (
    COMPUTE_UNITS,
    MEMORY,
    Device,
    DeviceSharing,
    Partition,
    Sharing,
    SharingSupport,
    Strategy,
)
from driver.schema import Fields

OPTION = "sharing"
INTERVALS = ("Default", "Short", "Medium", "Long")
LIMITS = (MEMORY, COMPUTE_UNITS)
# A limit is a plain amount: digits and an optional suffix (`20Gi`, `512Mi`, `30G`).
MEMORY_LIMIT = re.compile(r"^[0-9]+(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_OFF = ("off", "none", "false")
_ALL = ("on", "all", "true", "*")


# -- which devices are published shareable ---------------------------------------------------------


@dataclass(frozen=True)
class SharingPolicy:
    """`--sharing` and the `<backend>.sharing` options that narrow it.

    Per backend: None shares every device it supports, a tuple only devices whose model matches
    one of its patterns (shell-style, case-insensitive); an empty tuple none.
    """

    enabled: bool = False
    models: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)

    def shares(self, device: Device) -> bool:
        if not self.enabled or device.partition_profile is not None:
            return False
        patterns = self.models.get(device.backend)
        if patterns is None:
            return True
        model = device.model.lower()
        return any(fnmatch.fnmatchcase(model, pattern.lower()) for pattern in patterns)


def parse_policy(enabled: bool, backend_options: Mapping[str, Mapping[str, str]]) -> SharingPolicy:
    """The policy from `--sharing` and every `<backend>.sharing=off|all|PATTERN[|PATTERN...]`."""
    models: dict[str, tuple[str, ...] | None] = {}
    for backend, options in backend_options.items():
        value = options.get(OPTION)
        if value is None:
            continue
        text = value.strip()
        if text.lower() in _OFF:
            models[backend] = ()
        elif text.lower() in _ALL:
            models[backend] = None
        else:
            patterns = tuple(p.strip() for p in text.split("|") if p.strip())
            if not patterns:
                raise ConfigError(
                    "--backend-option",
                    f"{backend}.sharing={value!r}: expected off, all, or device models such as "
                    "'*H100*|*A100*'",
                )
            models[backend] = patterns
    return SharingPolicy(enabled=enabled, models=models)


# -- what a shareable device publishes ------------------------------------------------------------


def publishable(device: Device, support: SharingSupport | None) -> bool:
    """A device can be offered in shares only with room for two of the smallest (and a known size)."""
    return support is not None and total(device, MEMORY) >= 2 * support.memory_step


def total(device: Device | Partition, capacity_name: str) -> int:
    """A capacity of the device; 0 where the vendor stack could not say (then nothing is shared)."""
    known = device.memory_bytes if capacity_name == MEMORY else device.compute_units
    return known or 0


def capacity(device: Device, support: SharingSupport) -> dict[str, Any]:
    """Capacities of a shareable device, each with the request policy the scheduler applies.

    Every capacity needs a policy: one without is consumed whole by each share that does not
    ask for it, which would allow a single share. A share that asks for no memory takes all of
    it, so a claim written for whole devices keeps the device to itself.
    """
    step = support.memory_step
    whole = total(device, MEMORY) // step * step
    memory = {
        "value": quantities.canonical(total(device, MEMORY)),
        "requestPolicy": {
            "default": quantities.canonical(whole),
            "validRange": {"min": quantities.canonical(step), "step": quantities.canonical(step)},
        },
    }
    units = total(device, COMPUTE_UNITS)
    if not units:
        return {MEMORY: memory}  # an unknown count is left out, never published as 0
    if support.compute_shares:
        compute: dict[str, Any] = {
            "default": "0",
            "validRange": {"min": "0", "max": quantities.canonical(units), "step": "1"},
        }
    else:
        # Nothing can hold a compute share here: a claim asking for one must go elsewhere.
        compute = {"default": "0", "validValues": ["0"]}
    return {
        COMPUTE_UNITS: {"value": quantities.canonical(units), "requestPolicy": compute},
        MEMORY: memory,
    }


def attributes(support: SharingSupport) -> dict[str, dict[str, str]]:
    """`sharing`: the strategies a share may choose, its default first; `sharingLimits`: what the
    default holds per share, or `none` where nothing does."""
    default = support.strategies[0]
    held = sorted(support.limits.get(default, frozenset()))
    return {
        "sharing": {"string": ",".join(s.value for s in support.strategies)},
        "sharingLimits": {"string": ",".join(held) or "none"},
    }


# -- the `sharing` section of the opaque DeviceConfig ---------------------------------------------


@dataclass(frozen=True)
class SharingConfig:
    """A claim's or class's choice of strategy and limits; `path` names it in errors."""

    strategy: Strategy
    interval: str = ""
    memory_limit: int = 0
    compute_units_limit: int = 0
    path: str = "sharing"


def decode_config(fields: Fields) -> SharingConfig:
    """Decode `sharing`; the rules are the admission policy's, and errors name the field."""
    name = fields.string("strategy")
    try:
        strategy = Strategy(name)
    except ValueError:
        allowed = ", ".join(s.value for s in Strategy)
        raise ConfigError(
            fields.at("strategy"), f"must be one of {allowed}, not {name!r}"
        ) from None
    interval = fields.string("interval", "")
    if interval and strategy is not Strategy.TIME_SLICING:
        raise ConfigError(fields.at("interval"), "applies to strategy TimeSlicing only")
    if interval and interval not in INTERVALS:
        raise ConfigError(fields.at("interval"), f"must be one of {', '.join(INTERVALS)}")
    memory, compute = 0, 0
    if fields.typed("limits", dict, None) is not None:
        limits = Fields(fields.raw("limits"), fields.at("limits"))
        if strategy is Strategy.EXCLUSIVE:
            raise ConfigError(limits.path, "an Exclusive device has no limits to apply")
        text = limits.string(MEMORY, "")
        if text:
            if not MEMORY_LIMIT.match(text) or quantities.parse(text) <= 0:
                raise ConfigError(
                    limits.at(MEMORY), f"{text!r} is not a positive amount such as 20Gi"
                )
            if strategy is not Strategy.MPS:
                raise ConfigError(limits.at(MEMORY), "only strategy MPS can hold a memory limit")
            memory = math.ceil(quantities.parse(text))
        if COMPUTE_UNITS in limits.keys():  # noqa: SIM118 - Fields is not a dict
            compute = limits.integer(COMPUTE_UNITS)
            if compute < 1:
                raise ConfigError(limits.at(COMPUTE_UNITS), "must be at least 1")
        limits.finish()
    fields.finish()
    return SharingConfig(strategy, interval, memory, compute, fields.path)


# -- one allocation: the strategy and limits it runs under -----------------------------------------


def consumed(capacity_map: Mapping[str, str], driver: str) -> dict[str, int]:
    """An allocation's consumedCapacity as whole numbers (names as published, unqualified)."""
    amounts: dict[str, int] = {}
    for name, text in capacity_map.items():
        try:
            value = quantities.parse(text)
        except ValueError:
            raise ClaimError(
                f"malformed claim: consumedCapacity {name} is {text!r}, not a quantity"
            ) from None
        amounts[name.removeprefix(f"{driver}/")] = math.ceil(value)
    return amounts


def resolve(
    device: Device,
    support: SharingSupport | None,
    config: SharingConfig | None,
    share_id: str | None,
    used: Mapping[str, int],
) -> Sharing | None:
    """The strategy and limits of one allocation, or None when it uses the device alone.

    A share with no `sharing` config runs under the device's default strategy, unless it took so
    much memory that no other share fits: then it is alone anyway and nothing is set up.
    """
    where = config.path if config is not None else "sharing"
    if config is None:
        if share_id is None:
            return None
        if support is None:
            raise ClaimError(_cannot_share(device, share_id))
        if total(device, MEMORY) - used.get(MEMORY, 0) < support.memory_step:
            return None
        strategy = support.strategies[0]
    elif config.strategy is Strategy.EXCLUSIVE:
        if share_id is not None:
            raise ConfigError(
                f"{where}.strategy",
                f"is Exclusive, but {device.name} was allocated as a share (shareID {share_id}); "
                "claim a device published without --sharing for exclusive use",
            )
        return None
    else:
        strategy = config.strategy
        if support is None:
            raise ConfigError(f"{where}.strategy", f"{strategy}: {_cannot_share(device, None)}")
        if strategy not in support.strategies:
            offered = ", ".join(s.value for s in support.strategies)
            raise ConfigError(
                f"{where}.strategy",
                f"{strategy} is not available on {device.name} ({device.vendor} {device.model}); "
                f"it offers {offered}",
            )
        if config.interval and config.interval not in support.intervals:
            raise ConfigError(
                f"{where}.interval",
                f"{device.name} ({device.vendor}) cannot set a time-slice interval",
            )
    memory = _limit(device, support, strategy, config, share_id, used, MEMORY, where)
    compute = _limit(device, support, strategy, config, share_id, used, COMPUTE_UNITS, where)
    return Sharing(
        strategy=strategy,
        interval=config.interval if config is not None else "",
        memory_bytes=memory,
        compute_units=compute,
    )


def _limit(
    device: Device,
    support: SharingSupport,
    strategy: Strategy,
    config: SharingConfig | None,
    share_id: str | None,
    used: Mapping[str, int],
    capacity_name: str,
    where: str,
) -> int:
    """The limit of one capacity: the config's if it sets one, else what the share consumed."""
    asked = 0
    if config is not None:
        asked = config.memory_limit if capacity_name == MEMORY else config.compute_units_limit
    held = support.enforces(strategy, capacity_name)
    whole = total(device, capacity_name)
    bound = whole if share_id is None else used.get(capacity_name, 0)
    if asked:
        if not held:
            raise ConfigError(
                f"{where}.limits.{capacity_name}",
                f"{strategy} on {device.name} ({device.vendor}) cannot hold a {capacity_name} "
                "limit",
            )
        if asked > bound:
            of_what = "the device has" if share_id is None else "this share consumed"
            raise ConfigError(
                f"{where}.limits.{capacity_name}",
                f"{_amount(capacity_name, asked)} is more than the "
                f"{_amount(capacity_name, bound)} {of_what}",
            )
        return asked
    if share_id is None:
        return 0  # a whole allocation is limited only where its config says so
    if not held:
        if capacity_name == COMPUTE_UNITS and bound > 0:
            raise ConfigError(
                f"{where}.strategy",
                f"{strategy} on {device.name} cannot hold the {bound} compute units this share "
                "consumed; choose a strategy that can, or request none",
            )
        return 0
    # Zero consumed compute units means no compute share: the share is not capped.
    return 0 if bound >= whole else bound


def _cannot_share(device: Device, share_id: str | None) -> str:
    shared = f" but was allocated as a share (shareID {share_id})" if share_id else ""
    return (
        f"device {device.name} ({device.vendor} {device.model}) cannot be shared{shared}; "
        "see docs/sharing.md for what each vendor can share"
    )


def _amount(capacity_name: str, value: int) -> str:
    return quantities.binary(value) if capacity_name == MEMORY else f"{value} compute units"


# -- all allocations of a device together ----------------------------------------------------------


@dataclass(frozen=True)
class Holding:
    """One allocation of a device as the conflict check sees it."""

    claim: str
    share_id: str | None
    admin_access: bool
    used: Mapping[str, int]
    sharing: Sharing | None

    @property
    def exclusive(self) -> bool:
        return not self.admin_access and self.share_id is None

    @property
    def unknown(self) -> bool:
        """A share whose consumption is not known: rebuilt from CDI specs after the checkpoint was
        lost (the 1.36 scheduler always names what a share consumed)."""
        return self.share_id is not None and not self.used

    def amount(self, capacity_name: str, total: int) -> int:
        # Not knowing, assume the share holds everything: safe, until it is unprepared.
        return total if self.unknown else self.used.get(capacity_name, 0)


def conflict(
    device: Device | Partition, others: Sequence[Holding], wanted: Sequence[Holding]
) -> str | None:
    """Why `wanted` (one claim's allocations of `device`) cannot join `others`, or None.

    Admin access (monitoring) never counts. An exclusive allocation never meets another, shares
    together never use more than the device has, and they agree on one strategy.
    """
    users = [h for h in others if not h.admin_access]
    mine = [h for h in wanted if not h.admin_access]
    if not mine:
        return None
    exclusive = next((h.claim for h in users if h.exclusive), None)
    if exclusive is not None:
        return f"device {device.name} is already prepared for claim {exclusive}"
    if users and any(h.exclusive for h in mine):
        return (
            f"device {device.name} is already prepared for shares of claim {users[0].claim}; "
            "an exclusive allocation cannot join them"
        )
    for name in (MEMORY, COMPUTE_UNITS):
        whole = total(device, name)
        taken = sum(h.amount(name, whole) for h in (*users, *mine))
        if taken > whole:
            return (
                f"the shares of device {device.name} would use {_amount(name, taken)} of "
                f"{name}, more than its {_amount(name, whole)}"
            )
    theirs = {state_of(h.sharing) for h in users if h.sharing is not None}
    ours = {state_of(h.sharing) for h in mine if h.sharing is not None}
    if len(ours) > 1:
        return f"the allocations of device {device.name} in this claim ask for different strategies"
    if theirs and ours and theirs != ours:
        holder = next(h.claim for h in users if h.sharing is not None)
        return (
            f"device {device.name} is shared by claim {holder} with "
            f"{_describe(next(iter(theirs)))}; this claim asks for {_describe(next(iter(ours)))}"
        )
    return None


def units_taken(others: Sequence[Holding], wanted: Sequence[Holding]) -> bool:
    """Whether compute units planned for `wanted` went to another share since they were planned
    (two prepares at once): planning again gives free ones."""
    busy = {u for h in others for u in (h.sharing.units if h.sharing else ())}
    return bool(busy & {u for h in wanted for u in (h.sharing.units if h.sharing else ())})


def state_of(sharing: Sharing | None) -> DeviceSharing | None:
    return None if sharing is None else DeviceSharing(sharing.strategy, sharing.interval)


def device_state(sharings: Iterable[Sharing | None]) -> DeviceSharing | None:
    """What a device must be set up for: the common strategy of its allocations, if any."""
    for sharing in sharings:
        if sharing is not None:
            return state_of(sharing)
    return None


def assign_units(
    total: int, wanted: int, taken: Iterable[int], device: str = ""
) -> tuple[int, ...]:
    """The lowest `wanted` unit indices that no other share holds (ranges need not be contiguous)."""
    busy = set(taken)
    free = [unit for unit in range(total) if unit not in busy]
    if len(free) < wanted:
        where = f" on device {device}" if device else ""
        raise ClaimError(
            f"only {len(free)} compute units are free for masks{where}, but the share needs {wanted}"
        )
    return tuple(free[:wanted])


def _describe(state: DeviceSharing | None) -> str:
    if state is None:
        return "no sharing strategy"
    return f"{state.strategy}" + (f" (interval {state.interval})" if state.interval else "")
