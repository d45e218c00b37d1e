"""The one tracing hook: OpenTelemetry setup and W3C context over NATS headers.

Tracing is on when an OTLP endpoint is configured through the standard `OTEL_*` variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_SDK_DISABLED` is not
true. Otherwise the API's no-op tracer is used: spans cost a few attribute-free calls and nothing is
injected into headers. Spans are per request and per hop, never per token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
)

from contracts import ErrorCode, subjects

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)
tracer: Tracer = trace.get_tracer("llmbus")
_provider: TracerProvider | None = None
_enabled = False


def enabled() -> bool:
    return _enabled


def setup(service_name: str) -> None:
    """Install an SDK tracer provider with the exporters the environment asks for, if any."""
    provider = build_provider(service_name)
    if provider is not None:
        trace.set_tracer_provider(provider)
        use_provider(provider)


def _exporters() -> list[SpanExporter]:
    """The exporters `OTEL_TRACES_EXPORTER` names (default `otlp`), loaded as the SDK loads them: from
    the `opentelemetry_traces_exporter` entry points. `otlp` counts only with an endpoint configured
    (`OTEL_EXPORTER_OTLP_ENDPOINT` or `..._TRACES_ENDPOINT`): llmbus never sends to a default address."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    exporters: list[SpanExporter] = []
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    for configured in names:
        if configured in ("", "none") or (configured == "otlp" and not endpoint):
            continue
        name = configured
        if configured == "otlp":
            name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
        found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
        if not found:
            log.warning("OTEL_TRACES_EXPORTER names %r, which no installed package provides", name)
            continue
        exporters.append(found[0].load()())
    return exporters


def resource_attributes(service_name: str) -> dict[str, str]:
    """`service.name` stays the role's (`llmbus-edge`, `llmbus-generator`, ...) so the five services
    stay apart; an operator's `OTEL_SERVICE_NAME` becomes their `service.namespace` (unless
    `OTEL_RESOURCE_ATTRIBUTES` sets one), which is what it names: the deployment, not one process."""
    attributes = {"service.name": service_name}
    namespace = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    if namespace and "service.namespace=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.namespace"] = namespace
    return attributes


def build_provider(service_name: str) -> TracerProvider | None:
    """The provider the standard `OTEL_*` environment describes, or None when tracing is off.

    The SDK itself reads the rest: `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`,
    `OTEL_BSP_*`, the exporters' `OTEL_EXPORTER_OTLP_*`; `OTEL_PROPAGATORS` picks the propagators
    `inject`/`extract` use (default W3C `tracecontext,baggage`)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporters = _exporters()
    if not exporters:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = SdkTracerProvider(resource=Resource.create(resource_attributes(service_name)))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def use_provider(provider: TracerProvider) -> None:
    """Route llmbus's spans to `provider` (`setup` does; tests pass an in-memory one)."""
    global _enabled, _provider, tracer
    _provider = provider
    tracer = provider.get_tracer("llmbus")
    _enabled = True


def reset() -> None:
    """Tracing off again (tests): the no-op tracer, nothing injected."""
    global _enabled, _provider, tracer
    _provider = None
    tracer = trace.NoOpTracer()
    _enabled = False


def shutdown() -> None:
    """Flush and stop the exporter (buffered spans are sent)."""
    if _provider is not None and hasattr(_provider, "shutdown"):
        _provider.shutdown()


def inject(headers: dict[str, str]) -> None:
    """Adds `traceparent`/`tracestate` of the current span to outgoing NATS headers."""
    if _enabled:
        propagate.inject(headers)


@contextmanager
def publish_span(subject: str, message_id: str, headers: dict[str, str]) -> Iterator[Span]:
    """A producer span around one publish, its context injected into `headers`."""
    if not _enabled:  # the no-op tracer's span still costs a context attach per request
        yield INVALID_SPAN
        return
    with tracer.start_as_current_span(
        f"send {subjects.request_family(subject)}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.name": "publish",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "messaging.destination.template": destination_template(subject),
            "messaging.message.id": message_id,
        },
    ) as span:
        inject(headers)
        yield span


@contextmanager
def consume_span(
    subject: str, message_id: str, headers: Mapping[str, str] | None, consumer: str
) -> Iterator[Span]:
    """A consumer span, child of the publisher's context carried in the message headers."""
    if not _enabled:
        yield INVALID_SPAN
        return
    # Every header is offered to the configured propagators (`OTEL_PROPAGATORS`), not just W3C's.
    parent = propagate.extract(headers) if headers else None
    token = otel_context.attach(parent) if parent is not None else None
    try:
        with tracer.start_as_current_span(
            f"process {subjects.request_family(subject)}",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.name": "process",
                "messaging.operation.type": "process",
                "messaging.destination.name": subject,
                "messaging.destination.template": destination_template(subject),
                "messaging.consumer.group.name": consumer,
                "messaging.message.id": message_id,
            },
        ) as span:
            yield span
    finally:
        if token is not None:
            otel_context.detach(token)


def destination_template(subject: str) -> str:
    """`llm.req.generate.<model>` -> `llm.req.generate.{model}`: the subject without its variable part."""
    family = subjects.request_family(subject)
    return subject if family == subject else family + ".{model}"


def request_ended(span: Span, terminal: object, cancel_reason: str | None) -> None:
    """Marks a consumer span with how its request ended: `llmbus.outcome` is `ok`, the error code, or
    `handed_off` (another hop ends it). A failed request also gets `error.type` and ERROR status; one
    the client cancelled gets `error.type` but keeps an unset status (nothing here failed)."""
    if terminal is None:
        span.set_attribute("llmbus.outcome", "handed_off")
        return
    code = getattr(terminal, "code", None)
    span.set_attribute("llmbus.outcome", "ok" if code is None else str(code))
    if cancel_reason is not None:
        span.set_attribute("llmbus.cancel_reason", cancel_reason)
    if code is None:
        return
    span.set_attribute("error.type", str(code))
    if code != ErrorCode.CANCELLED:
        span.set_status(Status(StatusCode.ERROR, str(getattr(terminal, "message", "") or "")))


@contextmanager
def server_span(
    method: str, route: str, scheme: str, path: str, http_headers: Iterable[tuple[bytes, bytes]]
) -> Iterator[Span]:
    """The edge's one server span per HTTP request, however many ASGI sends a stream makes.

    A caller that sends `traceparent` gets its trace continued, as a direct NATS publisher does.
    """
    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in http_headers}
    parent = propagate.extract(carrier) if carrier else None
    with tracer.start_as_current_span(
        f"{method} {route}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "http.route": route,
            "url.path": path,
            "url.scheme": scheme,
        },
    ) as span:
        yield span


_links: ContextVar[tuple[SpanContext, ...]] = ContextVar("llmbus_span_links", default=())


def current_context() -> SpanContext:
    """The current span's context, to link to later (invalid, and so ignored, when tracing is off)."""
    return trace.get_current_span().get_span_context()


@contextmanager
def linked(contexts: Iterable[SpanContext]) -> Iterator[None]:
    """Model calls started inside link to `contexts`: one batched call that serves several requests
    is a child of one request's trace and linked from every one it carries."""
    token = _links.set(tuple(c for c in contexts if c.is_valid))
    try:
        yield
    finally:
        _links.reset(token)


def links() -> list[Link]:
    return [Link(context) for context in _links.get()]


def describe() -> str:
    """What `just traces` prints: where this environment's `OTEL_*` variables send spans."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return "tracing is off (OTEL_SDK_DISABLED=true)"
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    if endpoint and "otlp" in names:
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        return f"traces: OTLP {protocol} to {endpoint} (OTEL_TRACES_EXPORTER={names})"
    if names not in ("otlp", "none"):
        return f"traces: OTEL_TRACES_EXPORTER={names}"
    return (
        "tracing is off: set OTEL_EXPORTER_OTLP_ENDPOINT (under compose.yml the services send to "
        "Jaeger, whose UI is http://127.0.0.1:16686)"
    )


if __name__ == "__main__":
    print(describe())
