"""The one tracing hook: OpenTelemetry setup and W3C context over NATS headers.

Tracing is on when an OTLP endpoint is configured through the standard `OTEL_*` variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_SDK_DISABLED` is not
true. Otherwise the API's no-op tracer is used: spans cost a few attribute-free calls and nothing is
injected into headers. Spans are per request and per hop, never per token.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

tracer = trace.get_tracer("llmbus")
_enabled = False


def enabled() -> bool:
    return _enabled


def setup(service_name: str) -> None:
    """Install an SDK tracer provider with an OTLP exporter when the environment asks for one."""
    global _enabled
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
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
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True


def use_provider(provider: trace.TracerProvider) -> None:
    """Tests: route spans to an in-memory provider."""
    global _enabled, tracer
    tracer = provider.get_tracer("llmbus")
    _enabled = True


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def inject(headers: dict[str, str]) -> None:
    """Adds `traceparent`/`tracestate` of the current span to outgoing NATS headers."""
    if _enabled:
        propagate.inject(headers)


@contextmanager
def publish_span(subject: str, message_id: str, headers: dict[str, str]) -> Iterator[Span]:
    """A producer span around one publish, its context injected into `headers`."""
    with tracer.start_as_current_span(
        f"send {subject.rsplit('.', 1)[0]}",
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
    parent = propagate.extract(headers) if headers and "traceparent" in headers else None
    token = otel_context.attach(parent) if parent is not None else None
    try:
        with tracer.start_as_current_span(
            f"process {subject.rsplit('.', 1)[0]}",
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
