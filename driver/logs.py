"""Logging set-up: key=value text or JSON lines, emitted from a queue thread so a slow stdout never stalls gRPC.

Call sites log a constant message and put variable data in `extra={...}`; both formats print
those fields as structured keys.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a call site passed through `extra`."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{base}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, json.dumps(record.getMessage())]
        parts += [f"{key}={_text(value)}" for key, value in fields(record).items()]
        line = " ".join(parts)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update(fields(record))
        if record.exc_text:
            body["exception"] = record.exc_text
        return json.dumps(body, default=str)


def _text(value: object) -> str:
    rendered = value if isinstance(value, str) else json.dumps(value, default=str)
    return (
        json.dumps(rendered) if (not rendered or " " in rendered or '"' in rendered) else rendered
    )


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread with message and traceback rendered, fields kept."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


def setup(log_format: str = "text", verbosity: int = 0) -> None:
    """Configure the root logger once; -v enables debug logs."""
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    output = logging.StreamHandler(sys.stderr)
    output.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, output, respect_handler_level=False)
    root = logging.getLogger()
    root.handlers[:] = [_QueueHandler(records)]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    listener.start()
    atexit.register(listener.stop)
