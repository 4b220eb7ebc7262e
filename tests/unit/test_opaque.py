"""Opaque config: strict decoding with field paths, and DeviceClass < claim precedence (later entries win)."""

from __future__ import annotations

import pytest

from driver import opaque
from driver.claims import AllocationResult, ConfigEntry
from driver.errors import ConfigError

API = opaque.API_VERSION
P = "cfg"


def params(**extra: object) -> dict[str, object]:
    return {"apiVersion": API, "kind": "DeviceConfig", **extra}


@pytest.mark.parametrize(
    ("parameters", "path", "problem"),
    [
        ("text", "cfg", "must be an object"),
        ({"kind": "DeviceConfig"}, "cfg.apiVersion", "is required"),
        (params(apiVersion="v1"), "cfg.apiVersion", "must be resource.unidra.dev/v1alpha1"),
        (params(kind="GpuConfig"), "cfg.kind", "must be DeviceConfig"),
        (params(env=["A=1"]), "cfg.env", "must be object"),
        (params(env={"A": 1}), "cfg.env['A']", "must be a string"),
        (params(env={"1A": "x"}), "cfg.env['1A']", "not a valid environment variable name"),
        (params(env={"A-B": "x"}), "cfg.env['A-B']", "not a valid environment variable name"),
        (params(env={"UNIDRA_X": "x"}), "cfg.env['UNIDRA_X']", "reserved for the driver"),
        (
            params(env={"DRA_ADMIN_ACCESS": "true"}),
            "cfg.env['DRA_ADMIN_ACCESS']",
            "reserved for the driver",
        ),
        (params(env={"A": "x" * 1025}), "cfg.env['A']", "longer than 1024"),
        (params(env={f"V{i}": "x" for i in range(33)}), "cfg.env", "at most 32"),
        (params(extra=True), "cfg.extra", "unknown field"),
    ],
)
def test_invalid_configs_name_the_field(parameters: object, path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        opaque.decode(parameters, P)
    assert caught.value.path == path
    assert problem in caught.value.problem


def test_valid_config() -> None:
    config = opaque.decode(params(env={"NCCL_DEBUG": "INFO", "_X": ""}), P)
    assert config.env == {"NCCL_DEBUG": "INFO", "_X": ""}
    assert config.edits().env == ("NCCL_DEBUG=INFO", "_X=")


def entry(
    index: int,
    env: dict[str, str],
    source: str = "FromClaim",
    requests: tuple[str, ...] = (),
    driver: str = "d",
) -> ConfigEntry:
    return ConfigEntry(
        index=index, source=source, requests=requests, driver=driver, parameters=params(env=env)
    )


@pytest.mark.parametrize(
    ("entries", "request_name", "expected"),
    [
        ([entry(0, {"A": "claim"}), entry(1, {"A": "class"}, "FromClass")], "gpu", {"A": "claim"}),
        ([entry(0, {"A": "first"}), entry(1, {"A": "second"})], "gpu", {"A": "second"}),
        ([entry(0, {"A": "x"}, requests=("nic",))], "gpu", {}),
        ([entry(0, {"A": "x"}, requests=("gpu",))], "gpu/big", {"A": "x"}),
        ([entry(0, {"A": "x"}, requests=("gpu/small",))], "gpu/big", {}),
        ([entry(0, {"A": "x"}, driver="other"), entry(1, {"B": "y"})], "gpu", {"B": "y"}),
        ([entry(0, {"A": "1"}, "FromClass"), entry(1, {"B": "2"})], "gpu", {"A": "1", "B": "2"}),
    ],
    ids=[
        "claim-beats-class",
        "later-wins",
        "other-request",
        "subrequest-of-named-request",
        "other-subrequest",
        "other-driver",
        "merged",
    ],
)
def test_precedence(
    entries: list[ConfigEntry], request_name: str, expected: dict[str, str]
) -> None:
    decoded = opaque.decode_all(entries, "d")
    result = AllocationResult(request=request_name, driver="d", pool="p", device="x")
    assert opaque.effective(decoded, result).env == expected


def test_a_bad_entry_fails_even_when_it_applies_to_no_device() -> None:
    bad = ConfigEntry(
        index=3, source="FromClaim", requests=("nic",), driver="d", parameters={"kind": "x"}
    )
    with pytest.raises(ConfigError, match=r"config\[3\]\.opaque\.parameters\.apiVersion"):
        opaque.decode_all([bad], "d")


def test_a_later_sharing_section_replaces_an_earlier_one_whole() -> None:
    """The class asks for MPS with limits, the claim for time-slicing: the claim's section
    wins as a whole (MPS limits under time-slicing would make no sense), the env merges."""
    entries = [
        ConfigEntry(
            0,
            "FromClass",
            (),
            "d",
            params(env={"A": "1"}, sharing={"strategy": "MPS", "limits": {"memory": "8Gi"}}),
        ),
        ConfigEntry(1, "FromClaim", (), "d", params(sharing={"strategy": "TimeSlicing"})),
        ConfigEntry(2, "FromClaim", (), "d", params(env={"B": "2"})),
    ]
    result = AllocationResult(request="gpu", driver="d", pool="p", device="x")
    config = opaque.effective(opaque.decode_all(entries, "d"), result)
    assert config.env == {"A": "1", "B": "2"}
    assert config.sharing is not None
    assert (config.sharing.strategy.value, config.sharing.memory_limit) == ("TimeSlicing", 0)
    assert config.sharing.path == "status.allocation.devices.config[1].opaque.parameters.sharing"


def test_sharing_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        opaque.decode(params(sharing={"strategy": "MPS", "limits": {"memory": "lots"}}), P)
    assert caught.value.path == "cfg.sharing.limits.memory"
    with pytest.raises(ConfigError) as caught:
        opaque.decode(params(sharing=None), P)
    assert (caught.value.path, caught.value.problem) == ("cfg.sharing", "must be object, not null")
