"""Evaluate DRA device selectors and claim constraints over published slices, as the scheduler does.

Built on cel-python with the parts of Kubernetes' DRA CEL environment that selectors use:
`device.driver`, `device.attributes[domain].name`, `device.capacity[domain].name` as quantities,
`quantity()`, `semver()`, and `compareTo` / `isGreaterThan` / `isLessThan` on both. The
allocation search is exhaustive, which is fine for test-sized pools.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import celpy
from celpy import celtypes

from driver import quantities

STANDARD = "resource.kubernetes.io"


class Quantity(celtypes.IntType):
    """A resource quantity (exact bytes or units)."""


class Semver(celtypes.StringType):
    """A semantic version, ordered by precedence."""

    @property
    def key(self) -> tuple[int, ...]:
        core = str(self).split("+", 1)[0].split("-", 1)[0]
        return tuple(int(part) for part in core.split("."))


def _compare(a: Any, b: Any) -> celtypes.IntType:
    left, right = (a.key, b.key) if isinstance(a, Semver) else (int(a), int(b))
    return celtypes.IntType((left > right) - (left < right))


FUNCTIONS = {
    "quantity": lambda text: Quantity(int(quantities.parse(str(text)))),
    "semver": lambda text: Semver(str(text)),
    "compareTo": _compare,
    "isGreaterThan": lambda a, b: celtypes.BoolType(_compare(a, b) > 0),
    "isLessThan": lambda a, b: celtypes.BoolType(_compare(a, b) < 0),
}


@functools.cache
def _program(expression: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(expression), functions=FUNCTIONS)


def _cel_value(value: Mapping[str, Any]) -> Any:
    if "bool" in value:
        return celtypes.BoolType(value["bool"])
    if "int" in value:
        return celtypes.IntType(value["int"])
    if "version" in value:
        return Semver(value["version"])
    return celtypes.StringType(value["string"])


def activation(device: Mapping[str, Any], driver: str) -> dict[str, Any]:
    """The `device` variable for one published device; unqualified names live in the driver's domain."""
    attributes: dict[str, dict[str, Any]] = {}
    for key, value in device.get("attributes", {}).items():
        domain, _, name = key.rpartition("/")
        attributes.setdefault(domain or driver, {})[name] = _cel_value(value)
    capacity: dict[str, dict[str, Any]] = {}
    for key, value in device.get("capacity", {}).items():
        domain, _, name = key.rpartition("/")
        capacity.setdefault(domain or driver, {})[name] = Quantity(
            int(quantities.parse(value["value"]))
        )
    cel_map = celtypes.MapType
    return {
        "device": cel_map(
            {
                celtypes.StringType("driver"): celtypes.StringType(driver),
                celtypes.StringType("attributes"): cel_map(
                    {
                        celtypes.StringType(d): cel_map(
                            {celtypes.StringType(k): v for k, v in a.items()}
                        )
                        for d, a in attributes.items()
                    }
                ),
                celtypes.StringType("capacity"): cel_map(
                    {
                        celtypes.StringType(d): cel_map(
                            {celtypes.StringType(k): v for k, v in c.items()}
                        )
                        for d, c in capacity.items()
                    }
                ),
                celtypes.StringType("allowMultipleAllocations"): celtypes.BoolType(
                    device.get("allowMultipleAllocations") is True
                ),
            }
        )
    }


def matches(expression: str, device: Mapping[str, Any], driver: str) -> bool:
    result = _program(expression).evaluate(activation(device, driver))
    if isinstance(result, celpy.CELEvalError):
        raise AssertionError(f"CEL error on {device['name']}: {result}")
    return bool(result)


def candidates(
    request: Mapping[str, Any],
    classes: Mapping[str, Any],
    devices: Sequence[Mapping[str, Any]],
    driver: str,
) -> list[str]:
    """Devices a request may take: its class's selectors and its own, all true."""
    exactly = request["exactly"]
    expressions = [
        s["cel"]["expression"]
        for s in classes[exactly["deviceClassName"]]["spec"].get("selectors", [])
    ]
    expressions += [s["cel"]["expression"] for s in exactly.get("selectors", [])]
    wanted = exactly.get("capacity", {}).get("requests", {})
    return [
        d["name"]
        for d in devices
        if all(matches(e, d, driver) for e in expressions) and _fits(wanted, d)
    ]


def _fits(wanted: Mapping[str, str], device: Mapping[str, Any]) -> bool:
    """Capacity requests as the 1.36 scheduler applies them (tests/e2e/test_sharing.py checks
    the same on the real one): names as published, exactly; on a shareable device the request
    is rounded up by the capacity's policy; elsewhere it is a minimum."""
    published = device.get("capacity", {})
    for name, amount in wanted.items():
        if name not in published:
            return False
        value, need = quantities.parse(published[name]["value"]), quantities.parse(amount)
        policy = (
            published[name].get("requestPolicy") if device.get("allowMultipleAllocations") else None
        )
        if policy and "validValues" in policy:
            fitting = [v for v in map(quantities.parse, policy["validValues"]) if v >= need]
            need = min(fitting) if fitting else value + 1
        elif policy and "validRange" in policy:
            span = policy["validRange"]
            low = quantities.parse(span["min"])
            step = quantities.parse(span.get("step", "1"))
            need = max(low, low + math.ceil((need - low) / step) * step)
            if "max" in span and need > quantities.parse(span["max"]):
                return False
        if need > value:
            return False
    return True


def allocations(
    claim_spec: Mapping[str, Any],
    classes: Mapping[str, Any],
    devices: Sequence[Mapping[str, Any]],
    driver: str,
) -> Iterator[dict[str, tuple[str, ...]]]:
    """Every assignment of distinct devices to the requests that satisfies all matchAttribute constraints."""
    by_name = {d["name"]: d for d in devices}
    requests = claim_spec["devices"]["requests"]
    options = []
    for request in requests:
        names = candidates(request, classes, devices, driver)
        options.append(list(itertools.combinations(names, request["exactly"].get("count", 1))))
    for choice in itertools.product(*options):
        picked = [name for group in choice for name in group]
        if len(set(picked)) != len(picked):
            continue
        assignment = {r["name"]: group for r, group in zip(requests, choice, strict=True)}
        if all(
            _holds(c, assignment, by_name, driver)
            for c in claim_spec["devices"].get("constraints", [])
        ):
            yield assignment


def _holds(
    constraint: Mapping[str, Any],
    assignment: Mapping[str, tuple[str, ...]],
    by_name: Mapping[str, Any],
    driver: str,
) -> bool:
    attribute = constraint["matchAttribute"]
    names = [n for r in constraint.get("requests") or assignment for n in assignment[r]]
    domain, _, short = attribute.rpartition("/")
    key = short if domain == driver else attribute
    values = [by_name[n]["attributes"].get(key) for n in names]
    return None not in values and all(v == values[0] for v in values)
