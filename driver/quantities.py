"""Kubernetes resource quantities: the canonical form the API server stores, and parsing for comparison."""

from __future__ import annotations

import re
from fractions import Fraction

_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))((?:[eE][+-]?\d+)|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$"
)


def canonical(value: int) -> str:
    """A non-negative integer as the API server writes it back (`81920000000` -> `81920M`).

    Writing the canonical form ourselves keeps desired and stored slices equal, so a steady
    state needs no updates.
    """
    if value < 0:
        raise ValueError("quantities here are never negative")
    suffixes = ("", "k", "M", "G", "T", "P", "E")
    exponent = 0
    while value and value % 1000 == 0 and exponent < len(suffixes) - 1:
        value //= 1000
        exponent += 1
    return f"{value}{suffixes[exponent]}"


def binary(value: int) -> str:
    """Bytes for people: `30Gi`, `1536Mi`, or plain bytes when no binary unit divides them."""
    for suffix, power in sorted(_BINARY.items(), key=lambda item: -item[1]):
        if value and value % (1 << power) == 0:
            return f"{value >> power}{suffix}"
    return str(value)


def parse(text: str) -> Fraction:
    """The exact value of a quantity string; ValueError if it is not one."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, suffix = Fraction(match.group(1)), match.group(2) or ""
    if suffix in _BINARY:
        return number * Fraction(2 ** _BINARY[suffix])
    # "E" alone is exa; "E3" or "e-3" is an exponent.
    exponent = int(suffix[1:]) if suffix[:1] in ("e", "E") and len(suffix) > 1 else _DECIMAL[suffix]
    scale = Fraction(10**exponent) if exponent >= 0 else Fraction(1, 10**-exponent)
    return number * scale
