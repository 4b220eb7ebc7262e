"""Reading PromQL and Prometheus text for tests: which metrics and labels an expression uses,
and which a scrape exports."""

from __future__ import annotations

from collections.abc import Iterator

import promql_parser
from prometheus_client.parser import text_string_to_metric_families


def exported(text: str) -> dict[str, set[str]]:
    """Every sample name the driver exports, with the label names it carries."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def walk(expr: object) -> Iterator[object]:
    """Every node of a parsed PromQL expression, parents before children."""
    yield expr
    if isinstance(expr, promql_parser.MatrixSelector):
        yield from walk(expr.vector_selector)
    elif isinstance(expr, promql_parser.BinaryExpr):
        yield from walk(expr.lhs)
        yield from walk(expr.rhs)
    elif isinstance(expr, promql_parser.Call):
        for argument in expr.args:
            yield from walk(argument)
    elif isinstance(
        expr,
        promql_parser.AggregateExpr
        | promql_parser.ParenExpr
        | promql_parser.UnaryExpr
        | promql_parser.SubqueryExpr,
    ):
        yield from walk(expr.expr)


def selectors(expr: object) -> list[promql_parser.VectorSelector]:
    return [node for node in walk(expr) if isinstance(node, promql_parser.VectorSelector)]


def grouping(expr: object) -> Iterator[tuple[object, list[str]]]:
    """(subexpression, labels) for every by/without and on/ignoring clause."""
    for node in walk(expr):
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            yield node.expr, list(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and getattr(
            node.modifier, "matching", None
        ):
            yield node, list(node.modifier.matching.labels)
