"""FLEET: the cluster's accelerators from ResourceSlices, ResourceClaims, DeviceTaintRules, Pods,
Nodes and DeviceClasses; pure.

`Fleet` keeps compact records of those objects, applies watch events and relists, and recomputes
only the pools a change touches; `report()` assembles the cluster view. docs/fleet.md defines
every figure (states, groups, largestFreeGroup, fragmentation).
"""

from __future__ import annotations

import functools
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal, TypeVar

from driver import quantities

Kind = Literal["ResourceSlice", "ResourceClaim", "DeviceTaintRule", "Pod", "Node", "DeviceClass"]
KINDS: tuple[Kind, ...] = (
    "ResourceSlice",
    "ResourceClaim",
    "DeviceTaintRule",
    "Pod",
    "Node",
    "DeviceClass",
)
# Exclusive states of a whole device (`_state` decides them in use first, then why not free).
STATES = ("free", "allocated", "partitioned", "tainted", "unavailable")
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
DEFAULT_JOB_SIZES = (2, 4, 8)
EXTENDED_RESOURCE_CLAIM = "resource.kubernetes.io/extended-resource-claim"
# Every DeviceClass also answers to this extended resource name (DRAExtendedResource).
IMPLICIT_EXTENDED_RESOURCE = "deviceclass.resource.kubernetes.io/"

PoolKey = tuple[str, str]  # (driver, pool)
_H = TypeVar("_H")
DeviceKey = tuple[str, str, str]  # (driver, pool, device)
ObjectKey = tuple[str, str]  # (namespace, name)
Counters = tuple[tuple[str, Fraction], ...]


# -- records of API objects, kept small: 5,000 nodes of 8 devices must fit comfortably ------------


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str
    effect: str
    source: str  # "ResourceSlice" or "DeviceTaintRule/<name>"

    def blocks(self, driver: str) -> bool:
        """Whether it keeps new work off the device: a scheduling effect, or the driver's health taint."""
        return self.effect in BLOCKING_EFFECTS or self.key == f"{driver}/unhealthy"

    @property
    def text(self) -> str:
        return (
            f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"
        )


@dataclass(frozen=True, slots=True)
class SliceDevice:
    name: str
    node: str
    model: str  # empty: the device does not use Unidra's vocabulary
    vendor: str
    type: str
    interconnect: str
    domain: str
    partition: bool
    profile: str
    consumes: tuple[tuple[str, Counters], ...]
    taints: tuple[Taint, ...]


@dataclass(frozen=True, slots=True)
class SliceRecord:
    driver: str
    pool: str
    generation: int
    count: int
    devices: tuple[SliceDevice, ...]
    counter_sets: tuple[tuple[str, Counters], ...]

    @property
    def key(self) -> PoolKey:
        return (self.driver, self.pool)


@dataclass(frozen=True, slots=True)
class Allocation:
    driver: str
    pool: str
    device: str
    request: str
    admin: bool

    @property
    def key(self) -> DeviceKey:
        return (self.driver, self.pool, self.device)


@dataclass(frozen=True, slots=True)
class Request:
    name: str
    device_classes: tuple[str, ...]  # several for firstAvailable
    count: int | None  # None: allocationMode All


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    namespace: str
    name: str
    allocations: tuple[Allocation, ...]
    allocated: bool
    pods: tuple[str, ...]
    requests: tuple[Request, ...]
    extended_resource: bool


@dataclass(frozen=True, slots=True)
class RuleRecord:
    name: str
    driver: str
    pool: str
    device: str
    taint: Taint

    def matches(self, key: DeviceKey) -> bool:
        return all(not want or want == have for want, have in zip(self.selector, key, strict=True))

    @property
    def selector(self) -> DeviceKey:
        return (self.driver, self.pool, self.device)


@dataclass(frozen=True, slots=True)
class PodRecord:
    namespace: str
    name: str
    phase: str
    node: str
    claims: tuple[str, ...]
    # What an unscheduled pod asks for as extended resources (nvidia.com/gpu: 2): it has no
    # claim until the scheduler writes one.
    extended: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceClassRecord:
    name: str
    extended_resource_name: str


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node the scheduler places no new pods on, and why: cordoned, not ready or unreachable."""

    name: str
    reason: str


# -- the computed view ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holder:
    """A claim holding a device, or one of its partitions (`device` names the partition then)."""

    namespace: str
    claim: str
    request: str
    device: str
    admin: bool


@dataclass(frozen=True, slots=True)
class DeviceView:
    name: str
    state: str
    taints: tuple[Taint, ...]
    holders: tuple[Holder, ...]


@dataclass(frozen=True, slots=True)
class Group:
    """The whole devices of one model on one node and interconnect domain ("" for none)."""

    driver: str
    pool: str
    node: str
    model: str
    vendor: str
    type: str
    interconnect: str
    domain: str
    devices: tuple[DeviceView, ...]
    partitions_in_use: int
    counts: Mapping[str, int]
    # Partitions of the group's devices that could each be allocated now, by profile.
    free_partitions: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.devices)

    @property
    def largest_free_group(self) -> int:
        """All free devices of a group can go to one claim (one node, one domain)."""
        return self.counts["free"]


@dataclass(frozen=True, slots=True)
class Fragment:
    job_size: int
    stranded: int
    ratio: float


@dataclass(frozen=True, slots=True)
class ModelSummary:
    model: str
    vendor: str
    type: str
    counts: Mapping[str, int]
    total: int
    partitions_in_use: int
    largest_free_group: int
    fragmentation: tuple[Fragment, ...]


@dataclass(frozen=True, slots=True)
class DomainSummary:
    """An interconnect domain that spans nodes: a claim still takes devices of one node only."""

    model: str
    interconnect: str
    domain: str
    nodes: tuple[str, ...]
    counts: Mapping[str, int]
    total: int
    largest_free_group: int


@dataclass(frozen=True, slots=True)
class PodView:
    name: str
    phase: str
    node: str


@dataclass(frozen=True, slots=True)
class HeldDevice:
    driver: str
    pool: str
    node: str
    device: str
    model: str
    partition: bool


@dataclass(frozen=True, slots=True)
class ClaimView:
    namespace: str
    name: str
    pods: tuple[PodView, ...]
    devices: tuple[HeldDevice, ...]
    extended_resource: bool


@dataclass(frozen=True, slots=True)
class PendingPod:
    namespace: str
    pod: str
    claims: tuple[tuple[str, tuple[Request, ...]], ...]
    # Extended resources a DeviceClass serves, each as a Request named after the resource.
    extended: tuple[Request, ...] = ()


@dataclass(frozen=True, slots=True)
class Orphan:
    """An allocation naming a device that no published slice has (its node was drained or lost)."""

    namespace: str
    claim: str
    driver: str
    pool: str
    device: str


@dataclass(frozen=True, slots=True)
class Sync:
    """How far the view is built from one kind of object (filled in by the watcher)."""

    synced: bool = False  # listed at least once (or known not to be served)
    served: bool = True
    lists: int = 0
    objects: int = 0
    error: str = ""


@dataclass(frozen=True)
class Report:
    job_sizes: tuple[int, ...]
    models: tuple[ModelSummary, ...]
    groups: tuple[Group, ...]
    domains: tuple[DomainSummary, ...]
    claims: tuple[ClaimView, ...]
    pending: tuple[PendingPod, ...]
    orphans: tuple[Orphan, ...]
    ignored: tuple[tuple[str, int], ...]
    incomplete_pools: tuple[PoolKey, ...]
    # Nodes with devices that take no new pods, and why (cordoned, not ready, unreachable).
    unschedulable_nodes: tuple[tuple[str, str], ...] = ()
    sync: Mapping[Kind, Sync] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _PoolView:
    groups: tuple[Group, ...]
    foreign: int  # devices without Unidra's vocabulary
    complete: bool
    # Every device at the current generation: (node, model, partition); model "" without vocabulary.
    published: Mapping[str, tuple[str, str, bool]]
    nodes: frozenset[str]  # the nodes of its devices (a node change dirties these pools)


# -- parsing: tolerant, a malformed field degrades to a default and never hides other objects -----


def _text(value: Any) -> str:
    return sys.intern(value) if isinstance(value, str) else ""


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _attribute(attributes: Mapping[str, Any], driver: str, name: str) -> Any:
    """An attribute in the driver's own domain: unqualified, or qualified with the driver name."""
    entry = attributes.get(name)
    if entry is None:
        entry = attributes.get(f"{driver}/{name}")
    if not isinstance(entry, Mapping):
        return None
    for kind in ("string", "bool", "int", "version"):
        if kind in entry:
            return entry[kind]
    return None


def _counters(value: Any) -> Counters:
    return _parsed_counters(
        tuple(
            (_text(name), str(_map(entry).get("value", "")))
            for name, entry in sorted(_map(value).items())
        )
    )


@functools.lru_cache(maxsize=65536)
def _shared(value: _H) -> _H:
    """The first equal value seen: nodes of one model repeat the same consumed counters."""
    return value


@functools.lru_cache(maxsize=4096)
def _parsed_counters(raw: tuple[tuple[str, str], ...]) -> Counters:
    """One shared tuple per distinct set of counters: every node of a model publishes the same
    ones for each of its partitions (a DGX node with its MIG placements: 270 KiB, now 61)."""
    parsed = []
    for name, value in raw:
        try:
            parsed.append((name, quantities.parse(value)))
        except ValueError:
            continue  # an unreadable counter constrains nothing we could compute
    return tuple(parsed)


def _taint(item: Any, source: str) -> Taint:
    taint = _map(item)
    return Taint(
        _text(taint.get("key")), _text(taint.get("value")), _text(taint.get("effect")), source
    )


def parse_slice(obj: Mapping[str, Any]) -> SliceRecord:
    spec = _map(obj.get("spec"))
    driver = _text(spec.get("driver"))
    pool = _map(spec.get("pool"))
    node = _text(spec.get("nodeName"))
    devices = []
    for item in _list(spec.get("devices")):
        entry = _map(item)
        attributes = _map(entry.get("attributes"))
        model = _attribute(attributes, driver, "model")
        kind = _attribute(attributes, driver, "type")
        vocabulary = isinstance(model, str) and isinstance(kind, str)
        devices.append(
            SliceDevice(
                name=_text(entry.get("name")),
                node=node or _text(entry.get("nodeName")),
                model=_text(model) if vocabulary else "",
                vendor=_text(_attribute(attributes, driver, "vendor")),
                type=_text(kind) if vocabulary else "",
                interconnect=_text(_attribute(attributes, driver, "interconnect")),
                domain=_text(_attribute(attributes, driver, "interconnectDomain")),
                partition=_attribute(attributes, driver, "partition") is True,
                profile=_text(_attribute(attributes, driver, "partitionProfile")),
                consumes=_shared(
                    tuple(
                        (_text(_map(c).get("counterSet")), _counters(_map(c).get("counters")))
                        for c in _list(entry.get("consumesCounters"))
                    )
                ),
                taints=tuple(_taint(t, "ResourceSlice") for t in _list(entry.get("taints"))),
            )
        )
    return SliceRecord(
        driver=driver,
        pool=_text(pool.get("name")),
        generation=_int(pool.get("generation")),
        count=max(1, _int(pool.get("resourceSliceCount"))),
        devices=tuple(devices),
        counter_sets=tuple(
            (_text(_map(s).get("name")), _counters(_map(s).get("counters")))
            for s in _list(spec.get("sharedCounters"))
        ),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def parse_claim(obj: Mapping[str, Any]) -> ClaimRecord:
    meta = _meta(obj)
    status = _map(obj.get("status"))
    allocation = status.get("allocation")
    results = _list(_map(_map(allocation).get("devices")).get("results"))
    requests = []
    for item in _list(_map(_map(obj.get("spec")).get("devices")).get("requests")):
        entry = _map(item)
        alternatives = [_map(entry.get("exactly"))] if "exactly" in entry else []
        alternatives += [_map(sub) for sub in _list(entry.get("firstAvailable"))]
        if not alternatives:
            alternatives = [entry]  # v1beta1 shape: the request itself
        first = alternatives[0]
        requests.append(
            Request(
                name=_text(entry.get("name")),
                device_classes=tuple(_text(a.get("deviceClassName")) for a in alternatives),
                count=None
                if first.get("allocationMode") == "All"
                else _int(first.get("count")) or 1,
            )
        )
    return ClaimRecord(
        namespace=_text(meta.get("namespace")),
        name=_text(meta.get("name")),
        allocations=tuple(
            Allocation(
                driver=_text(r.get("driver")),
                pool=_text(r.get("pool")),
                device=_text(r.get("device")),
                request=_text(r.get("request")),
                admin=r.get("adminAccess") is True,
            )
            for r in map(_map, results)
        ),
        allocated=isinstance(allocation, Mapping),
        pods=tuple(
            _text(_map(c).get("name"))
            for c in _list(status.get("reservedFor"))
            if _map(c).get("resource") == "pods"
        ),
        requests=tuple(requests),
        extended_resource=EXTENDED_RESOURCE_CLAIM in _map(meta.get("annotations")),
    )


def parse_rule(obj: Mapping[str, Any]) -> RuleRecord | None:
    """The rule's selector and taint; None for a rule that selects nothing the view can tell:
    one without a selector (it matches no device), or one selecting by DeviceClass or CEL
    (v1alpha3, Kubernetes 1.33 and 1.34), which the view does not evaluate."""
    name = _text(_meta(obj).get("name"))
    spec = _map(obj.get("spec"))
    selector = spec.get("deviceSelector")
    if (
        not isinstance(selector, Mapping)
        or selector.get("deviceClassName")
        or selector.get("selectors")
    ):
        return None
    return RuleRecord(
        name=name,
        driver=_text(selector.get("driver")),
        pool=_text(selector.get("pool")),
        device=_text(selector.get("device")),
        taint=_taint(spec.get("taint"), f"DeviceTaintRule/{name}"),
    )


def parse_pod(obj: Mapping[str, Any]) -> PodRecord | None:
    """The pod's claims and phase, and an unscheduled pod's extended resources; None for a pod
    with neither (most pods: not kept)."""
    meta = _meta(obj)
    spec = _map(obj.get("spec"))
    status = _map(obj.get("status"))
    names = [_map(c).get("resourceClaimName") for c in _list(spec.get("resourceClaims"))]
    names += [_map(c).get("resourceClaimName") for c in _list(status.get("resourceClaimStatuses"))]
    names.append(_map(status.get("extendedResourceClaimStatus")).get("resourceClaimName"))
    claims = tuple(sorted({_text(n) for n in names if isinstance(n, str) and n}))
    node = _text(spec.get("nodeName"))
    extended = () if node else extended_requests(spec)
    if not claims and not spec.get("resourceClaims") and not extended:
        return None
    return PodRecord(
        namespace=_text(meta.get("namespace")),
        name=_text(meta.get("name")),
        phase=_text(status.get("phase")),
        node=node,
        claims=claims,
        extended=extended,
    )


def extended_requests(spec: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """The pod's extended resources as the scheduler counts them: the containers' sum, or the
    largest init container's when that is more. A limit alone is the request."""

    def requests(container: Any) -> dict[str, int]:
        resources = _map(_map(container).get("resources"))
        wanted = {**_map(resources.get("limits")), **_map(resources.get("requests"))}
        found = {}
        for name, value in wanted.items():
            if _is_extended(name):
                try:
                    found[name] = int(str(value))
                except ValueError:  # extended resources are whole numbers; the API enforces it
                    continue
        return found

    total: dict[str, int] = defaultdict(int)
    for container in _list(spec.get("containers")):
        for name, count in requests(container).items():
            total[name] += count
    for container in _list(spec.get("initContainers")):
        for name, count in requests(container).items():
            total[name] = max(total[name], count)
    return tuple(sorted((name, count) for name, count in total.items() if count > 0))


def _is_extended(name: str) -> bool:
    """Extended resources are domain-prefixed; Kubernetes' own domains name native ones."""
    domain = name.partition("/")[0] if "/" in name else ""
    native = domain == "kubernetes.io" or domain.endswith(".kubernetes.io")
    return bool(domain) and (not native or name.startswith(IMPLICIT_EXTENDED_RESOURCE))


def parse_device_class(obj: Mapping[str, Any]) -> DeviceClassRecord:
    return DeviceClassRecord(
        name=_text(_meta(obj).get("name")),
        extended_resource_name=_text(_map(obj.get("spec")).get("extendedResourceName")),
    )


def parse_node(obj: Mapping[str, Any]) -> NodeRecord | None:
    """Why no new pod lands on the node; None for a node that takes pods (most nodes: not kept).

    The scheduler skips cordoned nodes, and nodes whose Ready condition is False or Unknown
    (their `node.kubernetes.io/not-ready` and `unreachable` NoSchedule taints). Other node
    taints are left out: GPU nodes are often tainted so that only pods tolerating it land there.
    """
    ready = next(
        (
            _text(c.get("status"))
            for c in map(_map, _list(_map(obj.get("status")).get("conditions")))
            if c.get("type") == "Ready"
        ),
        "",
    )
    if _map(obj.get("spec")).get("unschedulable") is True:
        reason = "cordoned"
    elif ready in ("False", "Unknown"):
        reason = "not ready" if ready == "False" else "unreachable"
    else:
        return None
    return NodeRecord(_text(_meta(obj).get("name")), reason)


Record = SliceRecord | ClaimRecord | RuleRecord | PodRecord | NodeRecord | DeviceClassRecord


def parse(kind: Kind, obj: Mapping[str, Any]) -> Record | None:
    """The record of one object; None for one not kept: most pods and nodes, and taint rules
    whose selection the view cannot tell."""
    parsers: dict[str, Callable[[Mapping[str, Any]], Record | None]] = {
        "ResourceSlice": parse_slice,
        "ResourceClaim": parse_claim,
        "DeviceTaintRule": parse_rule,
        "Pod": parse_pod,
        "Node": parse_node,
        "DeviceClass": parse_device_class,
    }
    return parsers[kind](obj)


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = _meta(obj)
    return (_text(meta.get("namespace")), _text(meta.get("name")))


# -- the state ------------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Records of every watched object and the per-pool views; not thread-safe (the caller locks)."""

    slices: dict[ObjectKey, SliceRecord] = field(default_factory=dict)
    claims: dict[ObjectKey, ClaimRecord] = field(default_factory=dict)
    rules: dict[ObjectKey, RuleRecord] = field(default_factory=dict)
    pods: dict[ObjectKey, PodRecord] = field(default_factory=dict)
    nodes: dict[ObjectKey, NodeRecord] = field(default_factory=dict)  # only nodes taking no pods
    device_classes: dict[ObjectKey, DeviceClassRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._pool_slices: dict[PoolKey, set[ObjectKey]] = defaultdict(set)
        self._node_pools: dict[str, set[PoolKey]] = defaultdict(set)  # from the computed views
        self._holders: dict[DeviceKey, set[ObjectKey]] = defaultdict(set)
        self._pool_rules: dict[str, set[ObjectKey]] = defaultdict(set)  # "" selects every pool
        self._views: dict[PoolKey, _PoolView] = {}
        self._dirty: set[PoolKey] = set()

    # -- changes ----------------------------------------------------------------------------

    def apply(self, kind: Kind, change: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        self.put(kind, object_key(obj), None if change == "DELETED" else parse(kind, obj))

    def replace(self, kind: Kind, objects: Iterable[Mapping[str, Any]]) -> None:
        """A fresh list of one kind; see `replace_parsed`."""
        self.replace_parsed(kind, {object_key(o): parse(kind, o) for o in objects})

    def replace_parsed(self, kind: Kind, records: Mapping[ObjectKey, Record | None]) -> None:
        """A fresh list of one kind, parsed: what is gone is removed; unchanged objects dirty nothing."""
        for key, record in records.items():
            self.put(kind, key, record)
        for key in [k for k in self.table(kind) if k not in records]:
            self.put(kind, key, None)

    def table(self, kind: Kind) -> Mapping[ObjectKey, Any]:
        """The records of one kind."""
        tables: dict[str, dict[ObjectKey, Any]] = {
            "ResourceSlice": self.slices,
            "ResourceClaim": self.claims,
            "DeviceTaintRule": self.rules,
            "Pod": self.pods,
            "Node": self.nodes,
            "DeviceClass": self.device_classes,
        }
        return tables[kind]

    def put(self, kind: Kind, key: ObjectKey, record: Record | None) -> None:
        """Store (or, with None, forget) the record of one object."""
        if kind == "ResourceSlice":
            assert record is None or isinstance(record, SliceRecord)
            self._set_slice(key, record)
        elif kind == "ResourceClaim":
            assert record is None or isinstance(record, ClaimRecord)
            self._set_claim(key, record)
        elif kind == "DeviceTaintRule":
            assert record is None or isinstance(record, RuleRecord)
            self._set_rule(key, record)
        elif kind == "Node":
            assert record is None or isinstance(record, NodeRecord)
            self._set_node(key, record)
        elif isinstance(record, DeviceClassRecord):
            self.device_classes[key] = record
        elif kind == "DeviceClass":
            self.device_classes.pop(key, None)
        elif isinstance(record, PodRecord):
            self.pods[key] = record
        else:
            self.pods.pop(key, None)

    def _set_slice(self, key: ObjectKey, record: SliceRecord | None) -> None:
        old = self.slices.get(key)
        if old == record:
            return
        if old is not None:
            self._pool_slices[old.key].discard(key)
            self._dirty.add(old.key)
            if not self._pool_slices[old.key]:
                del self._pool_slices[old.key]
        if record is None:
            self.slices.pop(key, None)
            return
        self.slices[key] = record
        self._pool_slices[record.key].add(key)
        self._dirty.add(record.key)

    def _set_claim(self, key: ObjectKey, record: ClaimRecord | None) -> None:
        old = self.claims.get(key)
        if old == record:
            return
        for allocation in old.allocations if old else ():
            self._holders[allocation.key].discard(key)
            if not self._holders[allocation.key]:
                del self._holders[allocation.key]
            self._dirty.add(allocation.key[:2])
        if record is None:
            self.claims.pop(key, None)
            return
        self.claims[key] = record
        for allocation in record.allocations:
            self._holders[allocation.key].add(key)
            self._dirty.add(allocation.key[:2])

    def _set_rule(self, key: ObjectKey, record: RuleRecord | None) -> None:
        old = self.rules.get(key)
        if old == record:
            return
        for rule in (old, record):
            if rule is not None:
                self._dirty.update(
                    pool
                    for pool in self._pool_slices
                    if (not rule.driver or rule.driver == pool[0])
                    and (not rule.pool or rule.pool == pool[1])
                )
        if old is not None:
            self._pool_rules[old.pool].discard(key)
        if record is None:
            self.rules.pop(key, None)
        else:
            self.rules[key] = record
            self._pool_rules[record.pool].add(key)

    def _set_node(self, key: ObjectKey, record: NodeRecord | None) -> None:
        if self.nodes.get(key) == record:
            return  # a status update that changes nothing the view shows: most node events
        self._dirty.update(self._node_pools.get(key[1], ()))
        if record is None:
            self.nodes.pop(key, None)
        else:
            self.nodes[key] = record

    # -- views ------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Recompute the pools changed since the last call; returns how many."""
        dirty, self._dirty = self._dirty, set()
        for pool in dirty:
            old = self._views.pop(pool, None)
            for node in old.nodes if old else ():
                self._node_pools[node].discard(pool)
                if not self._node_pools[node]:
                    del self._node_pools[node]
            view = self._compute(pool)
            if view is not None:
                self._views[pool] = view
                for node in view.nodes:
                    self._node_pools[node].add(pool)
        return len(dirty)

    def groups(self) -> Iterator[Group]:
        """Every group, current as of the last `refresh()`."""
        for view in self._views.values():
            yield from view.groups

    def _compute(self, pool: PoolKey) -> _PoolView | None:
        keys = self._pool_slices.get(pool)
        if not keys:
            return None
        records = [self.slices[k] for k in keys]
        top = max(r.generation for r in records)
        current = [r for r in records if r.generation == top]
        complete = len(current) >= max(r.count for r in current)
        devices = [d for r in current for d in r.devices]
        capacity = {name: dict(c) for r in current for name, c in r.counter_sets}
        driver = pool[0]
        holders = {d.name: self._holders_of((*pool, d.name)) for d in devices}
        used: dict[str, dict[str, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
        for device in devices:
            if any(not h.admin for h in holders[device.name]):
                for counter_set, counters in device.consumes:
                    for name, value in counters:
                        used[counter_set][name] += value
        owner: dict[str, str] = {}  # counter set -> the whole device consuming from it
        for device in devices:
            if not device.partition:
                for counter_set, _ in device.consumes:
                    owner.setdefault(counter_set, device.name)
        rules = [
            rule
            for key in sorted(
                self._pool_rules.get(pool[1], set()) | self._pool_rules.get("", set())
            )
            if not (rule := self.rules[key]).driver or rule.driver == driver
        ]

        closed = {d.node for d in devices if ("", d.node) in self.nodes}

        def offered(device: SliceDevice) -> bool:
            """The scheduler allocates it: its pool is complete and its node takes new pods."""
            return complete and device.node not in closed

        def taints_of(device: SliceDevice) -> tuple[Taint, ...]:
            return device.taints + tuple(
                r.taint for r in rules if r.matches((driver, pool[1], device.name))
            )

        partition_holders: dict[str, list[Holder]] = defaultdict(list)
        free_partitions: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for device in devices:
            parent = (
                owner.get(device.consumes[0][0]) if device.partition and device.consumes else None
            )
            if parent is None:
                continue
            partition_holders[parent] += holders[device.name]
            if (
                _state(
                    device,
                    holders[device.name],
                    False,
                    taints_of(device),
                    driver,
                    offered(device),
                    capacity,
                    used,
                )
                == "free"
            ):
                free_partitions[parent][device.profile] += 1
        grouped: dict[tuple[str, str, str, str], list[tuple[SliceDevice, DeviceView, int]]] = (
            defaultdict(list)
        )
        foreign = 0
        for device in devices:
            if not device.model:
                foreign += 1
                continue
            if device.partition:
                continue
            taints = taints_of(device)
            parts = [h for h in partition_holders.get(device.name, ()) if not h.admin]
            state = _state(
                device,
                holders[device.name],
                bool(parts),
                taints,
                driver,
                offered(device),
                capacity,
                used,
            )
            view = DeviceView(
                device.name,
                state,
                taints,
                holders[device.name] + tuple(partition_holders.get(device.name, ())),
            )
            key = (device.node, device.model, device.interconnect, device.domain)
            grouped[key].append((device, view, len({h.device for h in parts})))
        groups = []
        for (node, model, interconnect, domain), members in sorted(grouped.items()):
            counts = dict.fromkeys(STATES, 0)
            for _, view, _ in members:
                counts[view.state] += 1
            first = members[0][0]
            partitions_free: dict[str, int] = defaultdict(int)
            for device, _, _ in members:
                for profile, count in free_partitions.get(device.name, {}).items():
                    partitions_free[profile] += count
            groups.append(
                Group(
                    driver=driver,
                    pool=pool[1],
                    node=node,
                    model=model,
                    vendor=first.vendor,
                    type=first.type,
                    interconnect=interconnect,
                    domain=domain,
                    devices=tuple(sorted((view for _, view, _ in members), key=lambda v: v.name)),
                    partitions_in_use=sum(n for _, _, n in members),
                    counts=counts,
                    free_partitions=dict(sorted(partitions_free.items())),
                )
            )
        published = {d.name: (d.node, d.model, d.partition) for d in devices}
        return _PoolView(
            tuple(groups),
            foreign,
            complete,
            published,
            frozenset(d.node for d in devices if d.node),
        )

    def _holders_of(self, device: DeviceKey) -> tuple[Holder, ...]:
        found = []
        for key in sorted(self._holders.get(device, ())):
            claim = self.claims[key]
            found += [
                Holder(claim.namespace, claim.name, a.request, a.device, a.admin)
                for a in claim.allocations
                if a.key == device
            ]
        return tuple(found)

    def report(self, job_sizes: Sequence[int] = DEFAULT_JOB_SIZES) -> Report:
        """The whole view; call `refresh()` first."""
        groups = sorted(self.groups(), key=lambda g: (g.node, g.driver, g.model, g.domain))
        vocabulary_drivers = {g.driver for g in groups}
        return Report(
            job_sizes=tuple(job_sizes),
            models=summarize_models(groups, job_sizes),
            groups=tuple(groups),
            domains=_domains(groups),
            claims=self._claim_views(vocabulary_drivers),
            pending=self._pending(),
            orphans=self._orphans(vocabulary_drivers),
            ignored=self._ignored(),
            incomplete_pools=tuple(sorted(p for p, v in self._views.items() if not v.complete)),
            unschedulable_nodes=tuple(
                sorted(
                    (r.name, r.reason) for r in self.nodes.values() if r.name in self._node_pools
                )
            ),
        )

    def _published(self, key: DeviceKey) -> tuple[str, str, bool] | None:
        """(node, model, partition) of a device at its pool's current generation."""
        view = self._views.get(key[:2])
        return None if view is None else view.published.get(key[2])

    def _claim_views(self, drivers: set[str]) -> tuple[ClaimView, ...]:
        views = []
        for claim in sorted(self.claims.values(), key=lambda c: (c.namespace, c.name)):
            held = []
            for allocation in claim.allocations:
                if allocation.driver in drivers:
                    node, model, partition = self._published(allocation.key) or ("", "", False)
                    held.append(
                        HeldDevice(
                            allocation.driver,
                            allocation.pool,
                            node,
                            allocation.device,
                            model,
                            partition,
                        )
                    )
            if held:
                views.append(
                    ClaimView(
                        claim.namespace,
                        claim.name,
                        tuple(self._pod(claim.namespace, p) for p in claim.pods),
                        tuple(held),
                        claim.extended_resource,
                    )
                )
        return tuple(views)

    def _pod(self, namespace: str, name: str) -> PodView:
        pod = self.pods.get((namespace, name))
        return PodView(name, pod.phase, pod.node) if pod else PodView(name, "", "")

    def _pending(self) -> tuple[PendingPod, ...]:
        waiting = []
        for pod in sorted(self.pods.values(), key=lambda p: (p.namespace, p.name)):
            if pod.phase != "Pending" or pod.node:
                continue
            claims = tuple(
                (name, claim.requests)
                for name in pod.claims
                if (claim := self.claims.get((pod.namespace, name))) is not None
                and not claim.allocated
            )
            extended = tuple(
                Request(resource, classes, count)
                for resource, count in pod.extended
                if (classes := self._classes_serving(resource))
            )
            if claims or extended:
                waiting.append(PendingPod(pod.namespace, pod.name, claims, extended))
        return tuple(waiting)

    def _classes_serving(self, resource: str) -> tuple[str, ...]:
        """The DeviceClasses an extended resource name stands for: the one naming it in
        extendedResourceName, or the class its implicit name carries."""
        implicit = resource.removeprefix(IMPLICIT_EXTENDED_RESOURCE)
        return tuple(
            sorted(
                c.name
                for c in self.device_classes.values()
                if c.extended_resource_name == resource
                or (implicit != resource and c.name == implicit)
            )
        )

    def _orphans(self, drivers: set[str]) -> tuple[Orphan, ...]:
        return tuple(
            Orphan(claim.namespace, claim.name, a.driver, a.pool, a.device)
            for claim in sorted(self.claims.values(), key=lambda c: (c.namespace, c.name))
            for a in claim.allocations
            if a.driver in drivers and self._published(a.key) is None
        )

    def _ignored(self) -> tuple[tuple[str, int], ...]:
        foreign: dict[str, int] = defaultdict(int)
        for (driver, _), view in self._views.items():
            foreign[driver] += view.foreign
        return tuple(sorted((d, n) for d, n in foreign.items() if n))


def _state(
    device: SliceDevice,
    holders: Sequence[Holder],
    partitions_held: bool,
    taints: Sequence[Taint],
    driver: str,
    offered: bool,
    capacity: Mapping[str, Mapping[str, Fraction]],
    used: Mapping[str, Mapping[str, Fraction]],
) -> str:
    """`offered`: the scheduler allocates from its pool (complete) on its node (taking pods)."""
    if any(not h.admin for h in holders):
        return "allocated"
    if partitions_held or not _fits(device, capacity, used):
        return "partitioned"
    if any(t.blocks(driver) for t in taints):
        return "tainted"
    if not offered:
        return "unavailable"
    return "free"


def _fits(
    device: SliceDevice,
    capacity: Mapping[str, Mapping[str, Fraction]],
    used: Mapping[str, Mapping[str, Fraction]],
) -> bool:
    """Whether the counters the device consumes are still there (a partition may have taken them)."""
    for counter_set, counters in device.consumes:
        have = capacity.get(counter_set)
        if have is None:
            continue
        spent = used.get(counter_set, {})
        for name, value in counters:
            if name in have and have[name] - spent.get(name, Fraction(0)) < value:
                return False
    return True


def fragmentation(free_per_group: Sequence[int], job_size: int) -> Fragment:
    """Free devices that no job of `job_size` devices, each inside one group, can use."""
    free = sum(free_per_group)
    usable = sum(job_size * (n // job_size) for n in free_per_group)
    stranded = free - usable
    return Fragment(job_size, stranded, round(stranded / free, 4) if free else 0.0)


def summarize_models(groups: Sequence[Group], job_sizes: Sequence[int]) -> tuple[ModelSummary, ...]:
    by_model: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        by_model[group.model].append(group)
    summaries = []
    for model, members in sorted(by_model.items()):
        free = [g.counts["free"] for g in members]
        summaries.append(
            ModelSummary(
                model=model,
                vendor=members[0].vendor,
                type=members[0].type,
                counts=_sum_counts(members),
                total=sum(g.total for g in members),
                partitions_in_use=sum(g.partitions_in_use for g in members),
                largest_free_group=max(free),
                fragmentation=tuple(fragmentation(free, n) for n in job_sizes),
            )
        )
    return tuple(summaries)


def _sum_counts(groups: Iterable[Group]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for group in groups:
        for state, value in group.counts.items():
            counts[state] += value
    return counts


def _domains(groups: Sequence[Group]) -> tuple[DomainSummary, ...]:
    by_domain: dict[tuple[str, str, str], list[Group]] = defaultdict(list)
    for group in groups:
        if group.domain:
            by_domain[(group.model, group.interconnect, group.domain)].append(group)
    return tuple(
        DomainSummary(
            model=model,
            interconnect=interconnect,
            domain=domain,
            nodes=tuple(sorted({g.node for g in members})),
            counts=_sum_counts(members),
            total=sum(g.total for g in members),
            largest_free_group=max(g.largest_free_group for g in members),
        )
        for (model, interconnect, domain), members in sorted(by_domain.items())
    )
