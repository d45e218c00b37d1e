"""The server's default model: for a request that names none (the native API, the simple and
queued dialects)."""

from __future__ import annotations

from functools import cache

from contracts import ErrorCode, LlmbusError
from services.classifier.routes import RouteTable
from services.runtime.settings import Settings


@cache
def _table(path: str) -> RouteTable:
    return RouteTable(path)


def default_model(settings: Settings) -> str:
    """`LLMBUS_DEFAULT_MODEL`, else the routes file's default route's model."""
    if settings.default_model:
        return settings.default_model
    try:
        return _table(settings.routes_file).current().default.model
    except Exception as exc:  # a broken routes file: say so, with the setting that avoids it
        raise LlmbusError(
            ErrorCode.BAD_REQUEST,
            f"the request names no model and there is no default (set LLMBUS_DEFAULT_MODEL): {exc}",
        ) from exc
