"""Quantities: the canonical form the API server stores, and exact parsing of every suffix."""

from __future__ import annotations

from fractions import Fraction

import pytest

from driver import quantities


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (132, "132"),
        (1000, "1k"),
        (81920000000, "81920M"),
        (85520809984, "85520809984"),
        (7 * 10**18, "7E"),
    ],
)
def test_canonical(value: int, text: str) -> None:
    assert quantities.canonical(value) == text
    assert quantities.parse(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("80Gi", 80 * 2**30),
        ("1.5k", 1500),
        ("500m", Fraction(1, 2)),
        ("1e3", 1000),
        ("2E-3", Fraction(2, 1000)),
        (".5", Fraction(1, 2)),
    ],
)
def test_parse(text: str, value: Fraction) -> None:
    assert quantities.parse(text) == value


@pytest.mark.parametrize("text", ["", "lots", "1.2.3", "5 Gi", "Gi"])
def test_not_a_quantity(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantities.parse(text)
