"""Structured logging: both formats carry the fields, and no call site uses a name LogRecord reserves.

A reserved name in `extra` (such as `created`) makes logging raise, which would crash the
thread that logged; the static check below finds every such call site before it runs.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

from driver import logs

REPO = Path(__file__).resolve().parents[2]
RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def test_no_call_site_passes_a_reserved_field_name() -> None:
    offenders = []
    for path in sorted((REPO / "driver").rglob("*.py")) + sorted((REPO / "vendors").rglob("*.py")):
        if "gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                if keyword.arg == "extra" and isinstance(keyword.value, ast.Dict):
                    keys = {k.value for k in keyword.value.keys if isinstance(k, ast.Constant)}
                    offenders += [
                        f"{path.relative_to(REPO)}:{node.lineno} {k}" for k in keys & RESERVED
                    ]
    assert offenders == []


def record(**fields: object) -> logging.LogRecord:
    item = logging.LogRecord(
        "driver.prepare", logging.INFO, __file__, 1, "Prepared claim", None, None
    )
    item.__dict__.update(fields)
    return item


def test_text_format_prints_fields_as_key_value() -> None:
    line = logs.TextFormatter().format(record(claim="ns/c", devices=2, note="two words"))
    assert line.split(" ", 2)[1:] == [
        "INFO",
        'driver.prepare "Prepared claim" claim=ns/c devices=2 note="two words"',
    ]


def test_json_format_is_one_object_per_line() -> None:
    body = json.loads(logs.JsonFormatter().format(record(claim="ns/c", uids=["a"])))
    assert body["msg"] == "Prepared claim" and body["claim"] == "ns/c" and body["uids"] == ["a"]
    assert body["level"] == "INFO" and body["logger"] == "driver.prepare"
