"""The sharing model (driver/sharing.py): which devices are shareable and what they publish, the
`sharing` config, the strategy and limits of one allocation, and the conflict check over all
allocations of a device."""

from __future__ import annotations

import re

import pytest

from driver import quantities, sharing
from driver.errors import ClaimError, ConfigError
from driver.model import (
    COMPUTE_UNITS,
    MEMORY,
    TIME_SLICING_ONLY,
    Device,
    DeviceSharing,
    DeviceType,
    Sharing,
    SharingSupport,
    Strategy,
)
from driver.schema import Fields
from driver.sharing import Holding, SharingConfig

GI = 1 << 30
SHARE = "3754b937-84d7-4c7e-8c8c-f8a1cc0301ec"
H100 = Device(
    backend="nvidia",
    vendor="nvidia",
    type=DeviceType.GPU,
    model="NVIDIA H100 80GB HBM3",
    architecture="hopper",
    uuid="GPU-1",
    index=0,
    memory_bytes=85520809984,  # 79.6 GiB, as NVML reports an "80GB" H100
    compute_units=132,
    pci_bus_id="0000:1b:00.0",
)
MPS = SharingSupport(
    strategies=(Strategy.MPS, Strategy.TIME_SLICING),
    limits={Strategy.MPS: frozenset({MEMORY, COMPUTE_UNITS})},
    intervals=sharing.INTERVALS,
)
MASKS = SharingSupport(
    strategies=(Strategy.TIME_SLICING,),
    limits={Strategy.TIME_SLICING: frozenset({COMPUTE_UNITS})},
    unit_masks=True,
)


def device(**changes: object) -> Device:
    values = {f: getattr(H100, f) for f in H100.__dataclass_fields__}
    values.update(changes)
    return Device(**values)  # type: ignore[arg-type]


# -- policy ----------------------------------------------------------------------------------------


def test_sharing_is_off_unless_asked_for() -> None:
    assert not sharing.parse_policy(False, {"nvidia": {"sharing": "all"}}).shares(H100)
    assert sharing.parse_policy(True, {}).shares(H100)


@pytest.mark.parametrize(
    ("option", "shared"),
    [
        ("off", False),
        ("all", True),
        ("*H100*", True),
        ("*a100*|*h100*", True),  # case-insensitive
        ("*A100*", False),
        ("NVIDIA H100 80GB HBM3", True),
    ],
)
def test_a_backend_option_narrows_sharing_by_model(option: str, shared: bool) -> None:
    policy = sharing.parse_policy(True, {"nvidia": {"sharing": option}})
    assert policy.shares(H100) is shared
    # Other backends keep the flag's default.
    assert policy.shares(device(backend="amd"))


def test_partitions_are_never_shared() -> None:
    mig = device(partition_profile="3g.40gb", name_suffix="mig-3g40gb-0")
    assert not sharing.parse_policy(True, {}).shares(mig)


def test_a_malformed_option_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--backend-option: nvidia.sharing=' \| ': expected"):
        sharing.parse_policy(True, {"nvidia": {"sharing": " | "}})


# -- what a shareable device publishes --------------------------------------------------------------


def test_capacity_has_a_request_policy_on_every_capacity() -> None:
    published = sharing.capacity(H100, MPS)
    assert published[MEMORY] == {
        "value": "85520809984",
        # A share that does not ask takes all whole GiB: whole-device claims keep the device.
        "requestPolicy": {
            "default": quantities.canonical(79 * GI),
            "validRange": {"min": "1073741824", "step": "1073741824"},
        },
    }
    assert published[COMPUTE_UNITS] == {
        "value": "132",
        "requestPolicy": {"default": "0", "validRange": {"min": "0", "max": "132", "step": "1"}},
    }


def test_no_compute_share_where_nothing_holds_one() -> None:
    published = sharing.capacity(H100, TIME_SLICING_ONLY)
    assert published[COMPUTE_UNITS]["requestPolicy"] == {"default": "0", "validValues": ["0"]}


def test_attributes_say_what_is_held() -> None:
    assert sharing.attributes(MPS) == {
        "sharing": {"string": "MPS,TimeSlicing"},
        "sharingLimits": {"string": "computeUnits,memory"},
    }
    assert sharing.attributes(TIME_SLICING_ONLY)["sharingLimits"] == {"string": "none"}


def test_a_device_too_small_for_two_shares_is_not_offered() -> None:
    assert not sharing.publishable(device(memory_bytes=GI + 1), MPS)
    assert sharing.publishable(device(memory_bytes=2 * GI), MPS)
    assert not sharing.publishable(H100, None)


# -- the sharing config ------------------------------------------------------------------------------


def decode(value: object) -> SharingConfig:
    return sharing.decode_config(Fields(value, "parameters.sharing"))


def test_decode_a_full_config() -> None:
    config = decode({"strategy": "MPS", "limits": {"memory": "20Gi", "computeUnits": 33}})
    assert (config.strategy, config.memory_limit, config.compute_units_limit) == (
        Strategy.MPS,
        20 * GI,
        33,
    )
    assert config.path == "parameters.sharing"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"strategy": "Shared"}, r"sharing.strategy: must be one of Exclusive, TimeSlicing, MPS"),
        ({"strategy": "MPS", "interval": "Long"}, r"sharing.interval: applies to strategy"),
        ({"strategy": "TimeSlicing", "interval": "Fast"}, r"sharing.interval: must be one of"),
        ({"strategy": "Exclusive", "limits": {}}, r"sharing.limits: an Exclusive device"),
        ({"strategy": "MPS", "limits": {"memory": "2.5Gi"}}, r"limits.memory: '2.5Gi' is not"),
        (
            {"strategy": "TimeSlicing", "limits": {"memory": "2Gi"}},
            r"limits.memory: only strategy MPS",
        ),
        ({"strategy": "MPS", "limits": {"computeUnits": 0}}, r"limits.computeUnits: must be at"),
        ({"strategy": "MPS", "limits": {"watts": 1}}, r"limits.watts: unknown field"),
    ],
)
def test_decode_errors_name_the_field(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        decode(value)


# -- one allocation ----------------------------------------------------------------------------------


def used(memory: int = 0, compute: int = 0) -> dict[str, int]:
    return {MEMORY: memory, COMPUTE_UNITS: compute}


def test_consumed_capacity_as_whole_numbers() -> None:
    assert sharing.consumed({"memory": "30Gi", "unidra.dev/computeUnits": "33"}, "unidra.dev") == {
        MEMORY: 30 * GI,
        COMPUTE_UNITS: 33,
    }
    with pytest.raises(ClaimError, match="consumedCapacity memory is 'lots'"):
        sharing.consumed({"memory": "lots"}, "unidra.dev")


def test_a_whole_allocation_without_config_is_not_shared() -> None:
    assert sharing.resolve(H100, MPS, None, None, {}) is None


def test_a_share_runs_under_the_default_strategy_with_its_consumed_limits() -> None:
    resolved = sharing.resolve(H100, MPS, None, SHARE, used(30 * GI, 33))
    assert resolved == Sharing(Strategy.MPS, memory_bytes=30 * GI, compute_units=33)


def test_a_share_without_compute_units_is_not_capped() -> None:
    resolved = sharing.resolve(H100, MPS, None, SHARE, used(30 * GI, 0))
    assert resolved is not None and resolved.compute_units == 0


def test_a_share_that_took_all_memory_is_alone_and_needs_no_strategy() -> None:
    assert sharing.resolve(H100, MPS, None, SHARE, used(79 * GI)) is None


def test_limits_below_the_consumed_share() -> None:
    config = SharingConfig(Strategy.MPS, memory_limit=20 * GI, compute_units_limit=10)
    resolved = sharing.resolve(H100, MPS, config, SHARE, used(30 * GI, 33))
    assert resolved == Sharing(Strategy.MPS, memory_bytes=20 * GI, compute_units=10)


def test_mps_for_the_pods_of_one_whole_device_claim() -> None:
    config = SharingConfig(Strategy.MPS, memory_limit=40 * GI)
    resolved = sharing.resolve(H100, MPS, config, None, {})
    assert resolved == Sharing(Strategy.MPS, memory_bytes=40 * GI)


def test_a_chosen_time_slice() -> None:
    config = SharingConfig(Strategy.TIME_SLICING, interval="Long")
    resolved = sharing.resolve(H100, MPS, config, SHARE, used(30 * GI))
    assert resolved == Sharing(Strategy.TIME_SLICING, interval="Long")


def test_unit_masks_hold_the_consumed_compute_units() -> None:
    amd = device(vendor="amd", backend="amd", compute_units=304)
    resolved = sharing.resolve(amd, MASKS, None, SHARE, used(64 * GI, 38))
    assert resolved == Sharing(Strategy.TIME_SLICING, compute_units=38)


P = "config[0].opaque.parameters.sharing"
E = re.escape(P)


@pytest.mark.parametrize(
    ("support", "config", "share", "use", "message"),
    [
        (None, None, SHARE, used(GI), "cannot be shared but was allocated as a share"),
        (MPS, SharingConfig(Strategy.EXCLUSIVE, path=P), SHARE, used(GI), f"{E}.strategy: is Excl"),
        (
            TIME_SLICING_ONLY,
            SharingConfig(Strategy.MPS, path=P),
            SHARE,
            used(GI),
            f"{E}.strategy: MPS is not available on gpu-0000-1b-00-0 .* it offers TimeSlicing",
        ),
        (
            None,
            SharingConfig(Strategy.TIME_SLICING, path=P),
            None,
            {},
            f"{E}.strategy: TimeSlicing: device gpu-0000-1b-00-0 .* cannot be shared",
        ),
        (
            MASKS,
            SharingConfig(Strategy.TIME_SLICING, interval="Long", path=P),
            SHARE,
            used(GI),
            f"{E}.interval: gpu-0000-1b-00-0 .* cannot set a time-slice interval",
        ),
        (
            MPS,
            SharingConfig(Strategy.MPS, memory_limit=40 * GI, path=P),
            SHARE,
            used(30 * GI),
            f"{E}.limits.memory: 40Gi is more than the 30Gi this share consumed",
        ),
        (
            MPS,
            SharingConfig(Strategy.TIME_SLICING, compute_units_limit=8, path=P),
            SHARE,
            used(30 * GI, 8),
            f"{E}.limits.computeUnits: TimeSlicing on gpu-0000-1b-00-0 .* cannot hold",
        ),
        (
            MPS,
            SharingConfig(Strategy.TIME_SLICING, path=P),
            SHARE,
            used(30 * GI, 33),
            f"{E}.strategy: TimeSlicing on gpu-0000-1b-00-0 cannot hold the 33 compute units",
        ),
    ],
)
def test_what_cannot_be_held_is_refused_naming_the_field(
    support: SharingSupport | None,
    config: SharingConfig | None,
    share: str | None,
    use: dict[str, int],
    message: str,
) -> None:
    with pytest.raises((ConfigError, ClaimError), match=message):
        sharing.resolve(H100, support, config, share, use)


# -- all allocations of a device --------------------------------------------------------------------


def share(claim: str, memory: int, compute: int = 0, **kind: object) -> Holding:
    state = kind.get("sharing", Sharing(Strategy.MPS))
    return Holding(claim, SHARE, bool(kind.get("admin", False)), used(memory, compute), state)  # type: ignore[arg-type]


def whole(claim: str) -> Holding:
    return Holding(claim, None, False, {}, None)


def test_shares_fit_until_the_device_is_full() -> None:
    assert sharing.conflict(H100, [share("a", 30 * GI)], [share("b", 30 * GI)]) is None
    problem = sharing.conflict(
        H100, [share("a", 30 * GI), share("b", 30 * GI)], [share("c", 30 * GI)]
    )
    assert problem == (
        "the shares of device gpu-0000-1b-00-0 would use 90Gi of memory, more than its 81559Mi"
    )


def test_compute_units_fit_too() -> None:
    problem = sharing.conflict(H100, [share("a", GI, 100)], [share("b", GI, 33)])
    assert problem is not None and "133 compute units of computeUnits" in problem


def test_two_shares_of_one_device_in_one_claim_add_up() -> None:
    assert sharing.conflict(H100, [], [share("a", 40 * GI), share("a", 39 * GI)]) is None
    assert sharing.conflict(H100, [], [share("a", 40 * GI), share("a", 40 * GI)]) is not None


def test_exclusive_and_shared_never_meet() -> None:
    assert "already prepared for claim a" in str(
        sharing.conflict(H100, [whole("a")], [share("b", GI)])
    )
    assert "cannot join them" in str(sharing.conflict(H100, [share("a", GI)], [whole("b")]))
    assert "already prepared for claim a" in str(sharing.conflict(H100, [whole("a")], [whole("b")]))


def test_admin_access_never_counts() -> None:
    monitor = share("m", 80 * GI, admin=True)
    assert sharing.conflict(H100, [whole("a")], [monitor]) is None
    assert sharing.conflict(H100, [monitor], [whole("b")]) is None


def test_shares_agree_on_the_strategy() -> None:
    sliced = Sharing(Strategy.TIME_SLICING, interval="Long")
    problem = sharing.conflict(H100, [share("a", GI)], [share("b", GI, sharing=sliced)])
    assert problem == (
        "device gpu-0000-1b-00-0 is shared by claim a with MPS; this claim asks for "
        "TimeSlicing (interval Long)"
    )
    # A share alone on its device needs no strategy, and never disagrees.
    assert sharing.conflict(H100, [share("a", GI, sharing=None)], [share("b", GI)]) is None


def test_masks_never_overlap() -> None:
    a = share("a", GI, 2, sharing=Sharing(Strategy.TIME_SLICING, compute_units=2, units=(0, 1)))
    b = share("b", GI, 2, sharing=Sharing(Strategy.TIME_SLICING, compute_units=2, units=(1, 2)))
    assert sharing.units_taken([a], [b])  # prepare plans b again instead of failing it
    c = share("c", GI, 2, sharing=Sharing(Strategy.TIME_SLICING, compute_units=2, units=(2, 3)))
    assert not sharing.units_taken([a], [c])


def test_units_are_the_lowest_free_ones() -> None:
    assert sharing.assign_units(8, 3, {0, 2}) == (1, 3, 4)
    with pytest.raises(ClaimError, match="only 2 compute units are free"):
        sharing.assign_units(4, 3, {0, 1})


def test_the_device_state_is_the_common_strategy() -> None:
    assert sharing.device_state([None, Sharing(Strategy.MPS, memory_bytes=GI)]) == DeviceSharing(
        Strategy.MPS
    )
    assert sharing.device_state([None]) is None


def test_binary_amounts_for_messages() -> None:
    assert [quantities.binary(v) for v in (30 * GI, 1536 << 20, 1000)] == ["30Gi", "1536Mi", "1000"]


def test_a_share_of_unknown_size_holds_the_whole_device() -> None:
    """After the checkpoint was rebuilt from CDI specs nobody knows what a share consumed."""
    rebuilt = Holding("a", SHARE, False, {}, None)
    assert rebuilt.unknown
    assert "would use" in str(sharing.conflict(H100, [rebuilt], [share("b", GI)]))
