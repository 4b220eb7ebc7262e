"""Opaque device config: strict decoding, validation, and DeviceClass < claim precedence.

Config kind (in `spec.devices.config[].opaque.parameters` of a claim or DeviceClass):

    apiVersion: resource.unidra.dev/v1alpha1
    kind: DeviceConfig
    env: {NAME: value}     # extra environment for containers using the devices
    sharing:               # how a shared device runs its users (docs/sharing.md)
      strategy: Exclusive | TimeSlicing | MPS
      interval: Default | Short | Medium | Long       # TimeSlicing
      limits: {memory: 20Gi, computeUnits: 33}        # at most what a share consumed

The same rules are compiled into the admission policy in manifests/ (see docs/config.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from driver import sharing
from driver.claims import AllocationResult, ConfigEntry
from driver.errors import ConfigError
from driver.model import ContainerEdits
from driver.schema import Fields
from driver.sharing import SharingConfig

API_VERSION = "resource.unidra.dev/v1alpha1"
KIND = "DeviceConfig"
MAX_ENV = 32
MAX_ENV_NAME = 128
MAX_ENV_VALUE = 1024
RESERVED_ENV_PREFIXES = ("UNIDRA_", "DRA_")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class DeviceConfig:
    """The effective config of one allocated device, after precedence."""

    env: Mapping[str, str] = field(default_factory=dict)
    sharing: SharingConfig | None = None

    def edits(self) -> ContainerEdits:
        return ContainerEdits(env=tuple(f"{k}={v}" for k, v in sorted(self.env.items())))

    def to_json(self) -> dict[str, object]:
        """What the checkpoint keeps; the sharing outcome is kept with the device instead."""
        return {"env": dict(self.env)} if self.env else {}


def decode(parameters: object, path: str) -> DeviceConfig:
    """Decode and validate one `opaque.parameters` object; errors name the field."""
    fields = Fields(parameters, path)
    api_version = fields.string("apiVersion")
    if api_version != API_VERSION:
        raise ConfigError(fields.at("apiVersion"), f"must be {API_VERSION}, not {api_version!r}")
    kind = fields.string("kind")
    if kind != KIND:
        raise ConfigError(fields.at("kind"), f"must be {KIND}, not {kind!r}")
    env = fields.string_map("env")
    section = fields.typed("sharing", dict, None)
    shared = None
    if section is not None:
        shared = sharing.decode_config(Fields(section, fields.at("sharing")))
    fields.finish()
    validate_env(env, fields.at("env"))
    return DeviceConfig(env=env, sharing=shared)


def decode_stored(stored: Mapping[str, object]) -> DeviceConfig:
    """Rebuild a config from the checkpoint, where it was stored after validation."""
    env = stored.get("env", {})
    return DeviceConfig(
        env={str(k): str(v) for k, v in env.items()} if isinstance(env, Mapping) else {}
    )


def validate_env(env: Mapping[str, str], path: str) -> None:
    if len(env) > MAX_ENV:
        raise ConfigError(path, f"at most {MAX_ENV} variables are allowed, not {len(env)}")
    for name, value in env.items():
        where = f"{path}[{name!r}]"
        if not _ENV_NAME.match(name) or len(name) > MAX_ENV_NAME:
            raise ConfigError(
                where,
                f"is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most {MAX_ENV_NAME} characters)",
            )
        if name.startswith(RESERVED_ENV_PREFIXES):
            raise ConfigError(
                where,
                f"names starting with {' or '.join(RESERVED_ENV_PREFIXES)} are reserved for the driver",
            )
        if len(value) > MAX_ENV_VALUE:
            raise ConfigError(where, f"value is longer than {MAX_ENV_VALUE} characters")


@dataclass(frozen=True)
class Decoded:
    entry: ConfigEntry
    config: DeviceConfig


def decode_all(entries: Iterable[ConfigEntry], driver: str) -> list[Decoded]:
    """Decode every entry of this driver in precedence order: DeviceClass first, then the claim's.

    Entries of other drivers are skipped. A bad entry is an error even if it applies to no device,
    so a typo never goes unnoticed.
    """
    ours = [entry for entry in entries if entry.driver == driver]
    ordered = [e for e in ours if e.source == "FromClass"] + [
        e for e in ours if e.source != "FromClass"
    ]
    return [
        Decoded(entry, decode(entry.parameters, f"{entry.path}.opaque.parameters"))
        for entry in ordered
    ]


def effective(decoded: Iterable[Decoded], result: AllocationResult) -> DeviceConfig:
    """Merge the configs that apply to one result; later entries win field by field, and a
    later `sharing` section replaces an earlier one whole (its fields only make sense together)."""
    env: dict[str, str] = {}
    shared: SharingConfig | None = None
    for item in decoded:
        requests = item.entry.requests
        if not requests or result.request in requests or result.base_request in requests:
            env.update(item.config.env)
            shared = item.config.sharing or shared
    return DeviceConfig(env=env, sharing=shared)
