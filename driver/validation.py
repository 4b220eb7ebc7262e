"""Check ResourceSlices against the API server's own rules before anything is sent; pure.

The limits are those of resource.k8s.io/v1 validation (Kubernetes 1.34-1.37), taking the
stricter value where versions differ (at most 4 taints per device, as in 1.34). Pool-wide
checks (unique device and counter-set names, counter references) are the ones the Go
ResourceSlice controller makes, since the API server cannot see across slices.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from driver import quantities
from driver.errors import UnidraError

MAX_DEVICES = 128
MAX_DEVICES_WITH_TAINTS_OR_COUNTERS = 64
MAX_ATTRIBUTES_AND_CAPACITIES = 32
MAX_ATTRIBUTE_VALUE = 64
MAX_ID = 32
MAX_TAINTS = 4
MAX_COUNTER_SETS = 8
MAX_COUNTERS = 32
MAX_CONSUMPTIONS = 2
MAX_VALID_VALUES = 10
TAINT_EFFECTS = ("NoSchedule", "NoExecute", "None")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[kMGTPE]|m|u|n)?$")
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(-(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(\.(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*)?"
    r"(\+[0-9a-zA-Z-]+(\.[0-9a-zA-Z-]+)*)?$"
)


class SliceInvalid(UnidraError):
    """Slices break the API's rules; every problem names the slice, the device and the field."""

    def __init__(self, problems: Sequence[str]) -> None:
        shown = "; ".join(problems[:10]) + (
            f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        super().__init__(f"invalid ResourceSlices: {shown}")
        self.problems = list(problems)


def check_pool(slices: Sequence[Mapping[str, Any]]) -> None:
    """Raise SliceInvalid unless every slice, and the pool they form, is valid."""
    problems = [
        p for index, item in enumerate(slices) for p in slice_problems(item, f"slice {index}")
    ]
    problems += pool_problems(slices)
    if problems:
        raise SliceInvalid(problems)


def slice_problems(obj: Mapping[str, Any], where: str = "slice") -> list[str]:
    problems: list[str] = []
    meta = obj.get("metadata", {})
    prefix = meta.get("generateName") or meta.get("name") or ""
    if not _is_subdomain(prefix.rstrip("-") + "-x" if meta.get("generateName") else prefix, 253):
        problems.append(f"{where}: metadata name {prefix!r} is not a DNS subdomain")
    spec = obj.get("spec", {})
    driver = spec.get("driver", "")
    if not _is_subdomain(driver, 63):
        problems.append(
            f"{where}: spec.driver {driver!r} must be a lowercase DNS subdomain of at most 63 characters"
        )
    pool = spec.get("pool", {})
    name = pool.get("name", "")
    if not name or len(name) > 253 or not all(_is_subdomain(part, 253) for part in name.split("/")):
        problems.append(f"{where}: spec.pool.name {name!r} must be DNS subdomains separated by '/'")
    if not isinstance(pool.get("generation"), int) or pool["generation"] < 0:
        problems.append(f"{where}: spec.pool.generation must be a non-negative integer")
    if not isinstance(pool.get("resourceSliceCount"), int) or pool["resourceSliceCount"] <= 0:
        problems.append(f"{where}: spec.pool.resourceSliceCount must be greater than zero")
    node = spec.get("nodeName")
    if not node or not _is_subdomain(node, 253):
        problems.append(f"{where}: spec.nodeName {node!r} is not a valid node name")
    devices = spec.get("devices") or []
    counter_sets = spec.get("sharedCounters") or []
    if devices and counter_sets:
        problems.append(f"{where}: only one of spec.sharedCounters or spec.devices is allowed")
    limited = any(d.get("taints") or d.get("consumesCounters") for d in devices)
    limit = MAX_DEVICES_WITH_TAINTS_OR_COUNTERS if limited else MAX_DEVICES
    if len(devices) > limit:
        reason = " when devices have taints or consume counters" if limited else ""
        problems.append(
            f"{where}: spec.devices has {len(devices)} devices; at most {limit} are allowed{reason}"
        )
    for index, device in enumerate(devices):
        label = f"{where}, device {device.get('name')!r}: spec.devices[{index}]"
        problems += _device_problems(device, label)
    if len(counter_sets) > MAX_COUNTER_SETS:
        problems.append(
            f"{where}: spec.sharedCounters has {len(counter_sets)} sets; at most {MAX_COUNTER_SETS}"
        )
    for index, counter_set in enumerate(counter_sets):
        label = f"{where}, counter set {counter_set.get('name')!r}: spec.sharedCounters[{index}]"
        problems += _name_problems(counter_set.get("name", ""), f"{label}.name")
        problems += _counter_problems(counter_set.get("counters") or {}, f"{label}.counters")
    return problems


def pool_problems(slices: Sequence[Mapping[str, Any]]) -> list[str]:
    """Rules across the slices of one pool: unique names, and counters that exist."""
    problems: list[str] = []
    sets: dict[str, Mapping[str, Any]] = {}
    names: set[str] = set()
    for item in slices:
        for counter_set in item.get("spec", {}).get("sharedCounters") or []:
            if counter_set.get("name") in sets:
                problems.append(f"pool: counter set {counter_set.get('name')!r} is defined twice")
            sets[counter_set.get("name", "")] = counter_set.get("counters") or {}
    for item in slices:
        for device in item.get("spec", {}).get("devices") or []:
            name = device.get("name")
            if name in names:
                problems.append(f"pool: device {name!r} appears twice")
            names.add(name)
            for consumption in device.get("consumesCounters") or []:
                set_name = consumption.get("counterSet")
                if set_name not in sets:
                    problems.append(
                        f"pool, device {name!r}: counter set {set_name!r} does not exist in the pool"
                    )
                    continue
                for counter in consumption.get("counters") or {}:
                    if counter not in sets[set_name]:
                        problems.append(
                            f"pool, device {name!r}: counter {counter!r} is not in counter set {set_name!r}"
                        )
    return problems


def _device_problems(device: Mapping[str, Any], label: str) -> list[str]:
    problems = _name_problems(device.get("name", ""), f"{label}.name")
    attributes = device.get("attributes") or {}
    capacity = device.get("capacity") or {}
    if len(attributes) + len(capacity) > MAX_ATTRIBUTES_AND_CAPACITIES:
        problems.append(
            f"{label}: {len(attributes)} attributes and {len(capacity)} capacities; "
            f"at most {MAX_ATTRIBUTES_AND_CAPACITIES} together"
        )
    for key, value in attributes.items():
        problems += _qualified_name_problems(key, f"{label}.attributes[{key!r}]")
        problems += _attribute_problems(value, f"{label}.attributes[{key!r}]")
    shareable = device.get("allowMultipleAllocations") is True
    for key, value in capacity.items():
        problems += _qualified_name_problems(key, f"{label}.capacity[{key!r}]")
        if not _QUANTITY.match(str(value.get("value", ""))):
            problems.append(
                f"{label}.capacity[{key!r}].value: {value.get('value')!r} is not a quantity"
            )
        elif "requestPolicy" in value:
            where = f"{label}.capacity[{key!r}].requestPolicy"
            if not shareable:
                problems.append(f"{where}: allowMultipleAllocations must be true")
            problems += _policy_problems(value["requestPolicy"], str(value["value"]), where)
    taints = device.get("taints") or []
    if len(taints) > MAX_TAINTS:
        problems.append(f"{label}.taints: {len(taints)} taints; at most {MAX_TAINTS}")
    for index, taint in enumerate(taints):
        problems += _taint_problems(taint, f"{label}.taints[{index}]")
    consumptions = device.get("consumesCounters") or []
    if len(consumptions) > MAX_CONSUMPTIONS:
        problems.append(f"{label}.consumesCounters: at most {MAX_CONSUMPTIONS} entries")
    seen: set[str] = set()
    for index, consumption in enumerate(consumptions):
        where = f"{label}.consumesCounters[{index}]"
        set_name = consumption.get("counterSet", "")
        if set_name in seen:
            problems.append(f"{where}.counterSet: {set_name!r} is listed twice")
        seen.add(set_name)
        problems += _name_problems(set_name, f"{where}.counterSet")
        problems += _counter_problems(consumption.get("counters") or {}, f"{where}.counters")
    return problems


def _policy_problems(policy: Mapping[str, Any], capacity: str, where: str) -> list[str]:
    """A consumable capacity's request policy: a default, and valid values or a valid range."""
    texts = [policy.get("default"), *policy.get("validValues", [])]
    texts += list((policy.get("validRange") or {}).values())
    bad = [t for t in texts if t is not None and not _QUANTITY.match(str(t))]
    if bad:
        return [f"{where}: {bad[0]!r} is not a quantity"]
    value = quantities.parse(capacity)
    default = quantities.parse(str(policy["default"])) if "default" in policy else None
    problems = []
    if default is not None and default > value:
        problems.append(
            f"{where}.default: {policy['default']} is more than the capacity {capacity}"
        )
    if "validValues" in policy and "validRange" in policy:
        problems.append(f"{where}: only one of validValues and validRange may be set")
    if "validValues" in policy:
        values = [quantities.parse(str(v)) for v in policy["validValues"]]
        if not values or len(values) > MAX_VALID_VALUES:
            problems.append(f"{where}.validValues: 1 to {MAX_VALID_VALUES} values are allowed")
        if any(b <= a for a, b in itertools.pairwise(values)):
            problems.append(f"{where}.validValues: must be in ascending order without repeats")
        if default is not None and default not in values:
            problems.append(f"{where}.validValues: must contain the default")
    span = policy.get("validRange")
    if span is not None:
        if "min" not in span:
            problems.append(f"{where}.validRange.min: is required")
            return problems
        low = quantities.parse(str(span["min"]))
        high = quantities.parse(str(span["max"])) if "max" in span else value
        if high < low:
            problems.append(f"{where}.validRange: max is less than min")
        if "step" in span and quantities.parse(str(span["step"])) <= 0:
            problems.append(f"{where}.validRange.step: must be positive")
        if default is not None and not low <= default <= high:
            problems.append(f"{where}.default: must lie within validRange")
    return problems


def _attribute_problems(value: Mapping[str, Any], where: str) -> list[str]:
    kinds = [k for k in ("bool", "int", "string", "version") if k in value]
    if len(kinds) != 1 or set(value) - {"bool", "int", "string", "version"}:
        return [f"{where}: exactly one of bool, int, string or version must be set"]
    kind = kinds[0]
    item = value[kind]
    expected = {"bool": bool, "int": int, "string": str, "version": str}[kind]
    if not isinstance(item, expected) or (kind == "int" and isinstance(item, bool)):
        return [f"{where}.{kind}: {item!r} is not a {kind}"]
    if isinstance(item, str) and len(item) > MAX_ATTRIBUTE_VALUE:
        return [f"{where}.{kind}: {len(item)} characters; at most {MAX_ATTRIBUTE_VALUE}"]
    if kind == "version" and isinstance(item, str) and not _SEMVER.match(item):
        return [f"{where}.version: {item!r} is not semver 2.0.0"]
    return []


def _qualified_name_problems(key: str, where: str) -> list[str]:
    domain, _, identifier = key.rpartition("/")
    problems = []
    if "/" in domain or (key.count("/") == 1 and not domain):
        problems.append(
            f"{where}: a qualified name is an identifier with at most one domain prefix"
        )
    elif domain and not _is_subdomain(domain, 63):
        problems.append(
            f"{where}: domain {domain!r} must be a DNS subdomain of at most 63 characters"
        )
    if not _C_IDENTIFIER.match(identifier) or len(identifier) > MAX_ID:
        problems.append(
            f"{where}: {identifier!r} must be a C identifier of at most {MAX_ID} characters"
        )
    return problems


def _counter_problems(counters: Mapping[str, Any], where: str) -> list[str]:
    if not counters:
        return [f"{where}: at least one counter is required"]
    problems = []
    if len(counters) > MAX_COUNTERS:
        problems.append(f"{where}: {len(counters)} counters; at most {MAX_COUNTERS}")
    for name, counter in counters.items():
        problems += _name_problems(name, f"{where}[{name!r}]")
        if not _QUANTITY.match(str(counter.get("value", ""))):
            problems.append(f"{where}[{name!r}].value: {counter.get('value')!r} is not a quantity")
    return problems


def _taint_problems(taint: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    key = taint.get("key", "")
    prefix, _, name = key.rpartition("/")
    if (
        not name
        or len(name) > 63
        or not _LABEL_PART.match(name)
        or (prefix and not _is_subdomain(prefix, 253))
    ):
        problems.append(f"{where}.key: {key!r} is not a valid label name")
    value = taint.get("value", "")
    if value and (len(value) > 63 or not _LABEL_PART.match(value)):
        problems.append(f"{where}.value: {value!r} is not a valid label value")
    if taint.get("effect") not in TAINT_EFFECTS:
        problems.append(
            f"{where}.effect: {taint.get('effect')!r} must be one of {', '.join(TAINT_EFFECTS)}"
        )
    return problems


def _name_problems(name: str, where: str) -> list[str]:
    if not _DNS_LABEL.match(name) or len(name) > 63:
        return [
            f"{where}: {name!r} must be a DNS label (lowercase letters, digits, '-', at most 63)"
        ]
    return []


def _is_subdomain(value: str, limit: int) -> bool:
    return bool(value) and len(value) <= limit and bool(_DNS_SUBDOMAIN.match(value))
