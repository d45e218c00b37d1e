"""The one tracing hook: OpenTelemetry setup and W3C context over NATS headers.

Tracing is on when an OTLP endpoint is configured through the standard `OTEL_*` variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_SDK_DISABLED` is not
true. Otherwise the API's no-op tracer is used: spans cost a few attribute-free calls and nothing is
injected into headers. Spans are per request and per hop, never per token.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanContext, SpanKind, Tracer, TracerProvider

from contracts import subjects

tracer: Tracer = trace.get_tracer("llmbus")
_provider: TracerProvider | None = None
_enabled = False


def enabled() -> bool:
    return _enabled


def setup(service_name: str) -> None:
    """Install an SDK tracer provider with an OTLP exporter when the environment asks for one."""
    provider = build_provider(service_name)
    if provider is not None:
        trace.set_tracer_provider(provider)
        use_provider(provider)


def build_provider(service_name: str) -> TracerProvider | None:
    """The OTLP-exporting provider the `OTEL_*` environment describes, or None when tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
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
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
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
    parent = propagate.extract(headers) if headers and "traceparent" in headers else None
    token = otel_context.attach(parent) if parent is not None else None
    try:
        with tracer.start_as_current_span(
            f"process {subjects.request_family(subject)}",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": subject,
                "messaging.consumer.group.name": consumer,
                "messaging.message.id": message_id,
            },
        ) as span:
            yield span
    finally:
        if token is not None:
            otel_context.detach(token)


@contextmanager
def server_span(
    method: str, route: str, scheme: str, path: str, http_headers: Iterable[tuple[bytes, bytes]]
) -> Iterator[Span]:
    """The edge's one server span per HTTP request, however many ASGI sends a stream makes.

    A caller that sends `traceparent` gets its trace continued, as a direct NATS publisher does.
    """
    carrier = {
        name.decode(): value.decode("latin-1")
        for name, value in http_headers
        if name in (b"traceparent", b"tracestate")
    }
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
