"""Evaluate a ValidatingAdmissionPolicy's CEL the way the API server does, with cel-python.

Implements matchConditions, variables (in order, each seeing the earlier ones), validations with
message or messageExpression, and the `object`, `oldObject` and `request` bindings.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import celpy
from celpy import json_to_cel


@dataclass(frozen=True)
class Verdict:
    matched: bool
    denials: tuple[str, ...]

    @property
    def allowed(self) -> bool:
        return not self.denials


def evaluate(policy: Mapping[str, Any], request: Mapping[str, Any]) -> Verdict:
    """`request` holds `operation`, `kind`, `userInfo`, `object` and `oldObject` (None when absent)."""
    spec = policy["spec"]
    activation: dict[str, Any] = {
        "object": json_to_cel(request.get("object")),
        "oldObject": json_to_cel(request.get("oldObject")),
        "request": json_to_cel(
            {k: v for k, v in request.items() if k not in ("object", "oldObject")}
        ),
    }
    for condition in spec.get("matchConditions", []):
        if not _run(condition["expression"], activation):
            return Verdict(matched=False, denials=())
    variables: dict[str, Any] = {}
    for variable in spec.get("variables", []):
        activation["variables"] = celpy.celtypes.MapType(variables)
        value = _run(variable["expression"], activation)
        # cel-python's || and && may answer a plain bool, which its ! does not take.
        variables[celpy.celtypes.StringType(variable["name"])] = (
            celpy.celtypes.BoolType(value) if isinstance(value, bool) else value
        )
    activation["variables"] = celpy.celtypes.MapType(variables)
    denials = []
    for validation in spec["validations"]:
        if _run(validation["expression"], activation) is not True:
            message = (
                str(_run(validation["messageExpression"], activation))
                if "messageExpression" in validation
                else validation["message"]
            )
            denials.append(message)
    return Verdict(matched=True, denials=tuple(denials))


@functools.cache
def _program(expression: str) -> Any:
    """Compiling is most of the cost, and the same policy is evaluated many times."""
    environment = celpy.Environment()
    return environment.program(environment.compile(expression))


def _run(expression: str, activation: Mapping[str, Any]) -> Any:
    result = _program(expression).evaluate(dict(activation))
    if isinstance(result, celpy.CELEvalError):
        raise AssertionError(f"CEL error in {expression!r}: {result}")
    return bool(result) if isinstance(result, celpy.celtypes.BoolType) else result
