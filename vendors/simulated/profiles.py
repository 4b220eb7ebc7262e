"""Node profiles for the simulated backend: the model catalog, built-in profiles and user profile files.

A profile places catalog models at PCI addresses with NUMA and interconnect placement; the
built-ins mirror real machines (see profiles/*.yaml). User files use the same schema and may add
models of their own under `models:`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from driver.errors import ConfigError
from driver.model import DeviceType
from driver.schema import Fields

_TEMPLATE = re.compile(r"\{([a-z0-9*+]+)\}")
_PCI = "{pci}"
_TERM = re.compile(r"^(?:(index|drm|start)(?:\*(\d+))?|(\d+))$")
_PROFILE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class NodeTemplate:
    """A device node whose path and minor may depend on the device's index."""

    path: str
    major: int
    minor: str


@dataclass(frozen=True)
class PartitionProfile:
    profile: str
    memory: int
    compute_units: int
    size: int
    placements: tuple[int, ...]
    consumes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class PartitionSpec:
    """How a model splits: placement slots, extra counters, and its partition profiles."""

    prefix: str
    slots: int
    slot_counter: str
    counters: tuple[tuple[str, int], ...]
    device_nodes: tuple[NodeTemplate, ...]
    profiles: tuple[PartitionProfile, ...]


@dataclass(frozen=True)
class ModelSpec:
    """One accelerator model as its vendor library would describe it."""

    key: str
    vendor: str
    type: DeviceType
    model: str
    architecture: str
    memory: int
    compute_units: int
    precisions: frozenset[str]
    pci_vendor_id: str
    pci_device_id: str
    compute_capability: str | None = None
    compute_target: str | None = None
    driver_version: str | None = None
    firmware_version: str | None = None
    uuid_prefix: str = ""
    interconnect: str | None = None
    device_nodes: tuple[NodeTemplate, ...] = ()
    shared_device_nodes: tuple[NodeTemplate, ...] = ()
    mounts: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    shared_env: tuple[str, ...] = ()
    claim_env: tuple[tuple[str, str], ...] = ()
    extra: tuple[tuple[str, str], ...] = ()
    partitions: PartitionSpec | None = None

    @property
    def uses_drm_numbering(self) -> bool:
        templates = [n.path + n.minor for n in self.device_nodes] + list(self.env)
        return any("{drm" in t for t in templates)


@dataclass(frozen=True)
class Placement:
    """Where one device of a profile sits."""

    model: ModelSpec
    pci_bus_id: str
    pcie_root: str | None
    numa_node: int | None
    interconnect_domain: str | None


@dataclass(frozen=True)
class NodeProfile:
    name: str
    description: str
    placements: tuple[Placement, ...]


def expand(template: str, index: int, drm: int, start: int = 0, pci: str = "") -> str:
    """Fill `{index}`, `{drm+128}`, `{index*64+start*2+1}` (sums of variables times constants) and `{pci}`."""
    bases = {"index": index, "drm": drm, "start": start}
    template = template.replace(_PCI, pci)

    def value(match: re.Match[str]) -> str:
        total = 0
        for term in match.group(1).split("+"):
            parsed = _TERM.match(term)
            if parsed is None:
                raise ConfigError(
                    template,
                    f"cannot evaluate {term!r}: use index, drm, start, * and +, or pci alone",
                )
            variable, factor, constant = parsed.groups()
            total += bases[variable] * int(factor or 1) if variable else int(constant)
        return str(total)

    return _TEMPLATE.sub(value, template)


def builtin_names() -> list[str]:
    """Names of the built-in profiles, e.g. `dgx-h100`."""
    folder = resources.files(__package__).joinpath("profiles")
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load(ref: str) -> NodeProfile:
    """Load a built-in profile by name, or a profile file by path."""
    catalog = _load_catalog()
    if ref in builtin_names():
        text = resources.files(__package__).joinpath("profiles", f"{ref}.yaml").read_text()
        return parse(ref, text, catalog)
    path = Path(ref)
    if path.suffix not in _PROFILE_SUFFIXES and not path.exists():
        known = ", ".join(builtin_names())
        raise ConfigError(
            "--simulate", f"{ref!r} is neither a built-in profile ({known}) nor a file"
        )
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError("--simulate", f"cannot read profile file {ref}: {err.strerror}") from err
    return parse(path.stem, text, catalog, source=str(path))


def parse(name: str, text: str, catalog: dict[str, ModelSpec], source: str = "") -> NodeProfile:
    """Parse a profile document; errors name the file and the field."""
    prefix = f"{source}: " if source else ""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(source or name, f"not valid YAML: {err}") from err
    try:
        fields = Fields(document, "")
        description = fields.string("description", "")
        models = dict(catalog)
        custom = fields.nested("models")
        if custom is not None:
            for key in custom.keys():  # noqa: SIM118 - Fields is not a dict
                models[key] = _parse_model(key, Fields(custom.raw(key), custom.at(key)))
        placements = []
        for path, group in fields.items("devices"):
            placements.extend(_parse_group(Fields(group, path), models))
        fields.finish()
    except ConfigError as err:
        raise ConfigError(prefix + err.path, err.problem) from err
    if not placements:
        raise ConfigError(prefix + "devices", "a profile needs at least one device")
    seen: set[str] = set()
    for placement in placements:
        if placement.pci_bus_id in seen:
            raise ConfigError(
                prefix + "devices", f"PCI address {placement.pci_bus_id} is used twice"
            )
        seen.add(placement.pci_bus_id)
    return NodeProfile(name, description, tuple(sorted(placements, key=lambda p: p.pci_bus_id)))


def _parse_group(fields: Fields, models: dict[str, ModelSpec]) -> list[Placement]:
    model_key = fields.string("model")
    if model_key not in models:
        known = ", ".join(sorted(models))
        raise ConfigError(fields.at("model"), f"unknown model {model_key!r}; known models: {known}")
    model = models[model_key]
    domain = fields.string("interconnectDomain", None)
    if domain is not None and model.interconnect is None:
        raise ConfigError(fields.at("interconnectDomain"), f"model {model_key} has no interconnect")
    placements = []
    for path, item in fields.items("instances"):
        instance = Fields(item, path)
        numa = instance.integer("numaNode", None)
        placements.append(
            Placement(
                model=model,
                pci_bus_id=instance.string("pciBusID"),
                pcie_root=instance.string("pcieRoot", None),
                numa_node=None if numa is None or numa < 0 else numa,
                interconnect_domain=domain,
            )
        )
        instance.finish()
    if not placements:
        raise ConfigError(fields.at("instances"), "needs at least one instance")
    fields.finish()
    return placements


def _parse_model(key: str, fields: Fields) -> ModelSpec:
    type_name = fields.string("type")
    try:
        device_type = DeviceType(type_name)
    except ValueError:
        allowed = ", ".join(t.value for t in DeviceType)
        raise ConfigError(fields.at("type"), f"must be one of {allowed}") from None
    spec = ModelSpec(
        key=key,
        vendor=fields.string("vendor"),
        type=device_type,
        model=fields.string("model"),
        architecture=fields.string("architecture"),
        memory=fields.integer("memory"),
        compute_units=fields.integer("computeUnits"),
        precisions=frozenset(fields.strings("precisions")),
        pci_vendor_id=fields.string("pciVendorId"),
        pci_device_id=fields.string("pciDeviceId"),
        compute_capability=fields.string("computeCapability", None),
        compute_target=fields.string("computeTarget", None),
        driver_version=fields.string("driverVersion", None),
        firmware_version=fields.string("firmwareVersion", None),
        uuid_prefix=fields.string("uuidPrefix", ""),
        interconnect=fields.string("interconnect", None),
        device_nodes=_parse_nodes(fields, "deviceNodes"),
        shared_device_nodes=_parse_nodes(fields, "sharedDeviceNodes"),
        mounts=_parse_mounts(fields),
        env=tuple(fields.strings("env")),
        shared_env=tuple(fields.strings("sharedEnv")),
        claim_env=tuple(fields.string_map("claimEnv").items()),
        extra=tuple(fields.string_map("extra").items()),
        partitions=_parse_partitions(fields.nested("partitions")),
    )
    fields.finish()
    return spec


def _parse_partitions(fields: Fields | None) -> PartitionSpec | None:
    if fields is None:
        return None
    slots = fields.integer("slots")
    profiles = []
    for path, item in fields.items("profiles"):
        entry = Fields(item, path)
        size = entry.integer("size")
        placements = []
        for where, start in entry.items("placements"):
            if (
                not isinstance(start, int)
                or isinstance(start, bool)
                or not 0 <= start <= slots - size
            ):
                raise ConfigError(where, f"must be a slot between 0 and {slots - size}")
            placements.append(start)
        profiles.append(
            PartitionProfile(
                profile=entry.string("profile"),
                memory=entry.integer("memoryMiB") * (1 << 20),
                compute_units=entry.integer("computeUnits"),
                size=size,
                placements=tuple(placements),
                consumes=tuple(_counter_map(entry, "consumes").items()),
            )
        )
        entry.finish()
    spec = PartitionSpec(
        prefix=fields.string("prefix"),
        slots=slots,
        slot_counter=fields.string("slotCounter"),
        counters=tuple(_counter_map(fields, "counters").items()),
        device_nodes=_parse_nodes(fields, "deviceNodes"),
        profiles=tuple(profiles),
    )
    fields.finish()
    return spec


def _counter_map(fields: Fields, key: str) -> dict[str, int]:
    nested = fields.nested(key)
    if nested is None:
        return {}
    counters = {name: nested.integer(name) for name in nested.keys()}  # noqa: SIM118
    nested.finish()
    return counters


def _parse_nodes(fields: Fields, key: str) -> tuple[NodeTemplate, ...]:
    nodes = []
    for path, item in fields.items(key):
        node = Fields(item, path)
        minor = node.raw("minor")
        if not isinstance(minor, int | str) or isinstance(minor, bool):
            raise ConfigError(node.at("minor"), "must be an integer or a template string")
        nodes.append(
            NodeTemplate(path=node.string("path"), major=node.integer("major"), minor=str(minor))
        )
        node.finish()
    return tuple(nodes)


def _parse_mounts(fields: Fields) -> tuple[str, ...]:
    mounts = []
    for path, value in fields.items("mounts"):
        # The simulated host is a /dev tree (--simulate-dev-root): nothing else has a place there.
        if not isinstance(value, str) or not value.startswith("/dev/"):
            raise ConfigError(path, "must be a path under /dev/")
        mounts.append(value)
    return tuple(mounts)


@functools.cache
def _load_catalog() -> dict[str, ModelSpec]:
    document = yaml.safe_load(resources.files(__package__).joinpath("catalog.yaml").read_text())
    top = Fields(document, "catalog.yaml")
    return {key: _parse_model(key, Fields(top.raw(key), key)) for key in top.keys()}  # noqa: SIM118
