"""Structured logs: one JSON object per line, with the request id and trace id of the request it
concerns.

The request id lives in a context variable that the worker sets around each job and the edge
around each HTTP request; tasks started inside inherit it. The trace id comes from the current
OpenTelemetry span (present when tracing is on). Nothing else of a request is added: no prompt,
no message text, no headers; URLs in messages have any `user:password@` removed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import trace

# The request id, or a function that reads it where it is kept (the edge's ASGI scope, since a
# handler may adopt the client's Idempotency-Key as the id after the request started).
request_id: ContextVar[str | Callable[[], str | None] | None] = ContextVar("llmbus_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@:]+:[^/\s@]+@")


@contextmanager
def request_scope(rid: str) -> Iterator[None]:
    """Every log line inside (and in tasks started inside) names request `rid`."""
    token = request_id.set(rid)
    try:
        yield
    finally:
        request_id.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
        }
        if self.service:
            out["service"] = self.service
        out["logger"] = record.name
        out["msg"] = _USERINFO.sub(r"\1***@", record.getMessage())
        rid = request_id.get()
        if callable(rid):
            rid = rid()
        if rid is not None:
            out["request_id"] = rid
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        # json.dumps escapes newlines (tracebacks included): one record is always one line.
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(JsonFormatter):
    """The same record for a person at a terminal: `12:00:01 warning llmbus-edge: message`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = json.loads(super().format(record))
        line = f"{fields.pop('ts')[11:19]} {fields.pop('level')} {fields.pop('service', fields['logger'])}: "
        line += str(fields.pop("msg"))
        if "request_id" in fields:
            line += f" [request {fields['request_id']}]"
        if "exc" in fields:
            line += "\n" + str(fields["exc"])
        return line


def is_text(fmt: str) -> bool:
    """`LLMBUS_LOG_FORMAT`: json, text, or auto (text when stderr is a terminal, else json)."""
    return fmt == "text" or (fmt == "auto" and sys.stderr.isatty())


def formatter(fmt: str, service: str | None = None) -> logging.Formatter:
    return TextFormatter(service) if is_text(fmt) else JsonFormatter(service)


def _timestamp(created: float) -> str:
    seconds = int(created)
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"
    )


_handler: logging.Handler | None = None


def setup(level: str, service: str | None = None, fmt: str = "json") -> None:
    """Log lines on stderr for the root logger (and so for every library that propagates)."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(formatter(fmt, service))
    root.addHandler(_handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per model call is noise
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def use_formatter(fmt: logging.Formatter) -> None:
    """Replaces the format `setup` chose (`llmbus up`'s own short lines)."""
    assert _handler is not None, "call setup first"
    _handler.setFormatter(fmt)
