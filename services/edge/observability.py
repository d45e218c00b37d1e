"""What the edge tells operators about each HTTP request, and `GET /metrics`.

One ASGI middleware per request: the server span (one per request, never one per ASGI send, so a
long SSE stream is one span), the log context (request id), and at the end the request metrics
and one `request finished` log line. The dispatcher's `on_accepted` hook (`accepted`, passed in by
services/edge/wiring.py) tells it which event feed the request follows, so the outcome code (the
feed's `Outcome`), model and time to first token come from the events themselves; a failure
raised instead names its code through Litestar's after-exception hook.
"""

from __future__ import annotations

import logging
import re
import time
from contextvars import ContextVar
from typing import Any

from litestar import Request, Response, get
from litestar.config.app import AppConfig
from litestar.di import NamedDependency
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.plugins import InitPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from nats.aio.client import Client
from opentelemetry.trace import Status, StatusCode

from services.edge.errors import code_for_status, code_of
from services.edge.feed import EventFeed
from services.runtime import logs, metrics, tracing

log = logging.getLogger("llmbus.edge")


class _Record:
    """One HTTP request, as it will be counted."""

    __slots__ = ("code", "endpoint", "feed", "model", "started", "status")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.status = 500  # until the response starts
        self.model = ""
        self.code: str | None = None
        self.feed: EventFeed | None = None

    def outcome(self) -> str:
        terminal = self.feed.outcome if self.feed is not None else None
        if self.status >= 400:  # the response says it failed: its own code first
            if self.code is not None:
                return self.code
            if terminal is not None and (code := terminal.code) != "ok":
                return code
            return str(code_for_status(self.status))
        if terminal is not None:  # a stream answers 200 and tells its outcome in its last event
            return terminal.code
        if self.feed is not None:
            return "cancelled"  # the client left before the end
        return "ok"


_current: ContextVar[_Record | None] = ContextVar("llmbus_edge_request", default=None)


def accepted(feed: EventFeed, model: str) -> None:
    """The dispatcher's `on_accepted` hook: once a request is on the bus, its events decide the outcome."""
    record = _current.get()
    if record is None or record.feed is not None:
        return  # not inside an HTTP request, or a second hop of the same one
    record.feed = feed
    record.model = model
    metrics.STREAMS_IN_FLIGHT.labels(record.endpoint).inc()


def _note_exception(exc: Exception, scope: Scope) -> None:
    """Litestar's after-exception hook: the failure's code is the outcome code (every error response
    of every API comes from an exception, so its body is never read back)."""
    record = _current.get()
    if record is not None:
        record.code = str(code_of(exc))


# Probes, scrapes, API docs and static files are neither traced nor counted.
_UNOBSERVED = re.compile(r"^/metrics$|^/health/|^/schema|^/static/|^/$")


def _unobserved(scope: Scope) -> bool:
    # The request path, not the handler's: `/schema/*` and `/static/*` are served by path routers.
    return _UNOBSERVED.match(scope["path"]) is not None


class ObservabilityMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)
    should_bypass_for_scope = staticmethod(_unobserved)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        route = scope.get("path_template") or scope["path"]
        record = _Record(route)

        trace_header: bytes | None = None

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if trace_header is not None:  # the demo page links each answer to its trace
                    message["headers"] = [*message.get("headers", ()), (b"x-trace-id", trace_header)]
            await send(message)

        record_token = _current.set(record)
        log_token = logs.request_id.set(lambda: _request_id(scope))
        try:
            if not tracing.enabled():
                await _serve(record, scope, receive, send_status, next_app)
                return
            method = str(scope.get("method", "GET"))
            with tracing.server_span(
                method, route, str(scope.get("scheme", "http")), scope["path"], scope["headers"]
            ) as span:
                context = span.get_span_context()
                if context.trace_flags.sampled:  # a trace the backend will have
                    trace_header = b"%032x" % context.trace_id
                try:
                    await _serve(record, scope, receive, send_status, next_app)
                finally:
                    span.set_attribute("http.response.status_code", record.status)
                    if (request_id := _request_id(scope)) is not None:
                        span.set_attribute("llmbus.request_id", request_id)
                    if record.model:
                        span.set_attribute("gen_ai.request.model", record.model)
                    if record.status >= 500:
                        span.set_attribute("error.type", str(record.status))
                        span.set_status(Status(StatusCode.ERROR))
        finally:
            logs.request_id.reset(log_token)
            _current.reset(record_token)


def _request_id(scope: Scope) -> str | None:
    """The id the handler gave the request (`request_id_of`, or the client's Idempotency-Key)."""
    rid = scope.get("state", {}).get("request_id")
    return None if rid is None else str(rid)


async def _serve(record: _Record, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
    try:
        await next_app(scope, receive, send)
    finally:
        _finish(record)


def _finish(record: _Record) -> None:
    duration = time.perf_counter() - record.started
    feed = record.feed
    if feed is not None:
        metrics.STREAMS_IN_FLIGHT.labels(record.endpoint).dec()
    ttft = None
    if feed is not None and feed.first_token_at is not None:
        ttft = feed.first_token_at - record.started
    code = record.outcome()
    routed = feed.routed if feed is not None else None
    model = record.model if routed is None else routed.model  # the model that answered, not `auto`
    record.feed = None  # tasks made during the request hold this record (their context): no cycle
    metrics.http_request_ended(record.endpoint, model, code, duration, ttft)
    if log.isEnabledFor(logging.INFO):  # (its fields are not built for nothing)
        log.info(
            "request finished",
            extra={
                "endpoint": record.endpoint,
                "model": model,
                "route": None if routed is None else routed.route,
                "code": code,
                "status": record.status,
                "duration_ms": round(duration * 1000, 3),
                "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
            },
        )


@get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics_endpoint(
    request: Request[Any, Any, Any], nc: NamedDependency[Client | None]
) -> Response[bytes]:
    if nc is not None:
        await metrics.poll_queues(nc.jetstream())  # queue depth is read per scrape, not per request
    body, content_type = metrics.render(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})


class Observability(InitPlugin):
    """Adds the middleware (outermost), the outcome hook and `GET /metrics` to the app."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        # Litestar's default logging config would replace the process's JSON handler with its own.
        app_config.logging_config = None
        app_config.middleware.insert(0, ObservabilityMiddleware())
        app_config.after_exception.append(_note_exception)
        app_config.route_handlers.append(metrics_endpoint)
        return app_config
