"""One trace per request across every hop: HTTP span -> NATS producer -> consumer -> model call.

Spans go to the SDK's in-memory exporter (in-process services, real NATS, the fake Ollama), and,
to prove the `OTEL_*` exporter configuration works end to end, to a real OTLP receiver process
(the Rust collector shipped in the `rotel` wheel, printing what it receives).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from contracts import subjects
from services.classifier.main import Classifier
from services.embedder.main import Embedder
from services.generator.main import Generator
from services.runtime import tracing
from services.runtime.backends.observed import FIRST_TOKEN
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests.fakes.ollama import FakeOllama
from tests.sse import collect

MODEL = "llama3.2:1b"
EMBED_MODEL = "nomic-embed-text"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}


async def trace_of(exporter: InMemorySpanExporter, trace_id: int, count: int) -> list[ReadableSpan]:
    """The spans of one trace once `count` have ended (the consumer span ends after the ack)."""
    async with asyncio.timeout(5):
        while True:
            found = [s for s in exporter.get_finished_spans() if s.context and s.context.trace_id == trace_id]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.01)


async def ended_span(exporter: InMemorySpanExporter, trace_id: int, kind: SpanKind) -> ReadableSpan:
    """The trace's one span of `kind`, once it has ended (a failing request's retried model calls
    may end several spans before its consumer span does)."""
    async with asyncio.timeout(5):
        while True:
            found = [s for s in exporter.get_finished_spans() if s.context and s.context.trace_id == trace_id]
            if any(s.kind == kind for s in found):
                return only(found, kind)
            await asyncio.sleep(0.01)


def only(spans: list[ReadableSpan], kind: SpanKind) -> ReadableSpan:
    [span] = [s for s in spans if s.kind == kind]
    return span


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


async def test_streaming_request_is_one_trace_from_http_span_to_model_call(
    spans: InMemorySpanExporter, client: httpx.AsyncClient
) -> None:
    async with client.stream("POST", "/v1/chat", json={**CHAT, "stream": True}) as response:
        request_id = response.headers["x-request-id"]
        events = await collect(response)
    tokens = [e for e in events if e.event == "token"]
    assert len(tokens) > 1 and events[-1].event == "done"

    [server] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.context is not None
    trace = await trace_of(spans, server.context.trace_id, 4)
    producer = only(trace, SpanKind.PRODUCER)
    consumer = only(trace, SpanKind.CONSUMER)
    model = only(trace, SpanKind.CLIENT)

    # The chain, in order: every hop is the child of the one before.
    assert parent_id(producer) == span_id(server)
    assert parent_id(consumer) == span_id(producer)
    assert parent_id(model) == span_id(consumer)
    assert [s.name for s in (server, producer, consumer, model)] == [
        "POST /v1/chat",
        "send llm.req.generate",
        "process llm.req.generate",
        f"chat {MODEL}",
    ]
    # No span per token and none per SSE write: the whole stream is these four spans.
    assert len(trace) == 4

    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/chat"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["llmbus.request_id"] == request_id
    assert response.headers["x-trace-id"] == format(server.context.trace_id, "032x")  # for the demo page
    for hop in (producer, consumer):
        assert hop.attributes is not None
        assert hop.attributes["messaging.system"] == "nats"
        assert hop.attributes["messaging.destination.name"] == subjects.generate_subject(MODEL)
        assert hop.attributes["messaging.message.id"] == request_id
        assert hop.attributes["messaging.destination.template"] == "llm.req.generate.{model}"
    assert producer.attributes is not None and consumer.attributes is not None
    assert producer.attributes["messaging.operation.name"] == "publish"
    assert consumer.attributes["messaging.operation.name"] == "process"
    assert consumer.attributes["llmbus.outcome"] == "ok" and consumer.status.is_unset

    done = events[-1].data
    assert model.attributes is not None
    assert model.attributes["gen_ai.operation.name"] == "chat"
    assert model.attributes["gen_ai.provider.name"] == "ollama"
    assert model.attributes["gen_ai.request.model"] == MODEL
    assert model.attributes["gen_ai.usage.input_tokens"] == done["usage"]["prompt_tokens"]
    assert model.attributes["gen_ai.usage.output_tokens"] == done["usage"]["completion_tokens"] == len(tokens)
    assert model.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert model.attributes["gen_ai.response.model"] == MODEL  # as Ollama's answer names it
    assert "gen_ai.system" not in model.attributes  # deprecated since semantic conventions 1.37
    assert [e.name for e in model.events] == [FIRST_TOKEN]  # once per request, not per token
    # The server span covers the whole stream, the model call included.
    assert server.start_time is not None and server.end_time is not None
    assert model.start_time is not None and model.end_time is not None
    assert server.start_time < model.start_time and model.end_time < server.end_time


async def test_direct_nats_publisher_traceparent_joins_its_trace(
    spans: InMemorySpanExporter, settings: Settings, generator: Generator
) -> None:
    trace_id, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    request_id = uuid.uuid4().hex
    nc = await nats.connect(settings.nats_url)
    try:
        events = await nc.subscribe(subjects.event_subject(request_id))
        await nc.jetstream().publish(
            subjects.generate_subject(MODEL),
            json.dumps({"id": request_id, "model": MODEL, "prompt": "Hi"}).encode(),
            headers={"Nats-Msg-Id": request_id, "traceparent": f"00-{trace_id}-{caller_span}-01"},
        )
        async with asyncio.timeout(5):
            async for msg in events.messages:
                if json.loads(msg.data)["type"] in ("done", "error"):
                    assert json.loads(msg.data)["type"] == "done"
                    break
    finally:
        await nc.close()

    trace = await trace_of(spans, int(trace_id, 16), 2)
    consumer = only(trace, SpanKind.CONSUMER)
    model = only(trace, SpanKind.CLIENT)
    assert parent_id(consumer) == int(caller_span, 16)
    assert parent_id(model) == span_id(consumer)
    assert model.name == f"text_completion {MODEL}"


async def test_http_client_traceparent_is_continued_by_the_edge(
    spans: InMemorySpanExporter, client: httpx.AsyncClient
) -> None:
    trace_id, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    response = await client.post(
        "/v1/generate",
        json={"model": MODEL, "prompt": "Hi"},
        headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
    )
    assert response.status_code == 200
    trace = await trace_of(spans, int(trace_id, 16), 4)
    server = only(trace, SpanKind.SERVER)
    assert parent_id(server) == int(caller_span, 16)
    assert server.name == "POST /v1/generate"


async def test_failed_model_call_is_marked_on_its_span(
    spans: InMemorySpanExporter, client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.fail_status = 404
    response = await client.post("/v1/generate", json={"model": MODEL, "prompt": "Hi"})
    assert response.json()["error"]["code"] == "model_not_found"
    [server] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.context is not None
    model = only(await trace_of(spans, server.context.trace_id, 4), SpanKind.CLIENT)
    assert model.attributes is not None
    assert model.attributes["error.type"] == "model_not_found"
    assert not model.status.is_ok
    assert model.events == ()  # no token ever came


async def test_a_failed_request_ends_its_consumer_span_in_error(
    spans: InMemorySpanExporter, client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.fail_status = 500
    response = await client.post("/v1/generate", json={"model": MODEL, "prompt": "Hi"})
    code = response.json()["error"]["code"]
    assert code != "ok"
    [server] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.context is not None
    consumer = await ended_span(spans, server.context.trace_id, SpanKind.CONSUMER)
    assert consumer.attributes is not None
    assert consumer.attributes["llmbus.outcome"] == code  # the terminal event's code, not "ok"
    assert consumer.attributes["error.type"] == code
    assert consumer.status.status_code is StatusCode.ERROR


async def test_the_classifier_starts_without_stray_root_traces(
    spans: InMemorySpanExporter, settings: Settings
) -> None:
    # Its start embeds every route's examples: model calls that belong to no request.
    service = Classifier(msgspec.structs.replace(settings, routes_file="infra/routes.toml"))
    await service.start()
    try:
        await asyncio.sleep(0.1)
    finally:
        await service.stop(grace=0)
    assert [s.name for s in spans.get_finished_spans()] == []


def test_service_names_stay_per_role_under_otel_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "acme-gateway")
    assert tracing.resource_attributes("llmbus-edge") == {
        "service.name": "llmbus-edge",
        "service.namespace": "acme-gateway",
    }
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.namespace=prod")  # the SDK applies it
    assert tracing.resource_attributes("llmbus-edge") == {"service.name": "llmbus-edge"}


def test_exporters_come_from_otel_traces_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = tracing.build_provider("llmbus-test")
    assert isinstance(provider, TracerProvider)
    provider.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.build_provider("llmbus-test") is None


async def test_one_batched_embedding_call_links_every_request_it_carries(
    spans: InMemorySpanExporter, settings: Settings
) -> None:
    # A batch only its size flushes: the two requests share one backend call.
    embedder = Embedder(msgspec.structs.replace(settings, embed_max_batch=2, embed_max_wait_ms=60_000.0))
    await embedder.start()
    nc = await nats.connect(settings.nats_url)
    callers = {uuid.uuid4().hex: uuid.uuid4().hex[:16] for _ in range(2)}  # trace id -> caller span
    try:
        subs = []
        for trace_id, caller in callers.items():
            request_id = uuid.uuid4().hex
            subs.append(await nc.subscribe(subjects.event_subject(request_id)))
            await nc.jetstream().publish(
                subjects.embed_subject(EMBED_MODEL),
                json.dumps({"id": request_id, "model": EMBED_MODEL, "input": f"text {trace_id}"}).encode(),
                headers={"Nats-Msg-Id": request_id, "traceparent": f"00-{trace_id}-{caller}-01"},
            )
        for sub in subs:
            assert json.loads((await sub.next_msg(timeout=5)).data)["type"] == "embeddings"
    finally:
        await nc.close()
        await embedder.stop(grace=0)

    consumers = {}
    for trace_id, caller in callers.items():
        trace = await trace_of(spans, int(trace_id, 16), 1)
        consumer = only(trace, SpanKind.CONSUMER)
        assert parent_id(consumer) == int(caller, 16)
        consumers[trace_id] = consumer
    [call] = [s for s in spans.get_finished_spans() if s.name == f"embeddings {EMBED_MODEL}"]
    assert call.context is not None and format(call.context.trace_id, "032x") in callers  # one trace's child
    assert {link.context.span_id for link in call.links} == {span_id(c) for c in consumers.values()}
    assert call.attributes is not None and call.attributes["gen_ai.usage.input_tokens"] > 0


async def test_tracing_off_sends_no_trace_context(settings: Settings, client: httpx.AsyncClient) -> None:
    assert not tracing.enabled()
    nc = await nats.connect(settings.nats_url)
    try:
        requests = await nc.subscribe(subjects.REQUEST_SUBJECTS)  # sees what JetStream stores
        response = await client.post("/v1/generate", json={"model": MODEL, "prompt": "Hi"})
        assert response.status_code == 200
        msg = await requests.next_msg(timeout=2)
    finally:
        await nc.close()
    assert msg.headers is not None and "Nats-Msg-Id" in msg.headers
    assert "traceparent" not in msg.headers
    assert "x-trace-id" not in response.headers


# ------------------------------------------------------------------- a real OTLP receiver process
def rotel_binary() -> Path:
    rotel = pytest.importorskip("rotel", reason="the OTLP receiver comes with the dev extra")
    return Path(rotel.__file__).parent / "rotel-agent"


class Receiver:
    """rotel: receives OTLP (gRPC and HTTP), prints every span it gets, exports nowhere."""

    def __init__(self, workdir: Path) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.output = workdir / "rotel.out"
        self.workdir = workdir

    def __enter__(self) -> Receiver:
        self.out = self.output.open("wb")
        self.proc = subprocess.Popen(
            [
                str(rotel_binary()),
                "start",
                "--exporter=blackhole",
                "--debug-log=traces",
                "--debug-log-verbosity=detailed",
                f"--otlp-grpc-endpoint=127.0.0.1:{self.grpc_port}",
                f"--otlp-http-endpoint=127.0.0.1:{self.http_port}",
                f"--pid-file={self.workdir / 'rotel.pid'}",
                f"--log-file={self.workdir / 'rotel.log'}",
            ],
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while b"Starting Rotel" not in self.output.read_bytes():
            assert self.proc.poll() is None, self.output.read_text()
            assert time.monotonic() < deadline, "rotel did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self.out.close()

    async def trace_with(self, attribute: str, count: int) -> list[dict[str, str]]:
        """The printed spans of the trace one of whose spans has `attribute`, once `count` arrived."""
        async with asyncio.timeout(10):
            while True:
                spans = printed_spans(self.output.read_text())
                mine = [s for s in spans if attribute in s["text"]]
                if mine:
                    trace = [s for s in spans if s["trace"] == mine[0]["trace"]]
                    if len(trace) >= count:
                        return trace
                await asyncio.sleep(0.05)


def printed_spans(text: str) -> list[dict[str, str]]:
    """rotel's detailed debug output, one dict per span."""
    spans = []
    for block in re.split(r"\n\s*Span #\d+\n", text)[1:]:
        fields = dict(re.findall(r"^\s*(Trace ID|Parent ID|ID|Name|Kind)\s*: ?(.*)$", block, re.M))
        spans.append(
            {
                "trace": fields["Trace ID"],
                "parent": fields["Parent ID"].strip(),
                "id": fields["ID"],
                "name": fields["Name"],
                "kind": fields["Kind"],
                "text": block,
            }
        )
    return spans


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with Receiver(tmp_path) as running:
        yield running


@pytest.fixture
async def exported(
    receiver: Receiver, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TracerProvider]:
    """Tracing configured only through the standard environment variables, as a service is."""
    protocol = request.param
    port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    provider = tracing.build_provider("llmbus-test")
    assert isinstance(provider, TracerProvider)
    tracing.use_provider(provider)
    yield provider
    tracing.reset()
    provider.shutdown()


@pytest.mark.parametrize("exported", ["http/protobuf", "grpc"], indirect=True)
async def test_spans_reach_a_real_otlp_receiver(
    exported: TracerProvider, receiver: Receiver, client: httpx.AsyncClient
) -> None:
    async with client.stream("POST", "/v1/chat", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        await collect(response)
    trace = await receiver.trace_with(f"llmbus.request_id: Str({request_id})", 4)
    by_name = {span["name"]: span for span in trace}
    server, producer = by_name["POST /v1/chat"], by_name["send llm.req.generate"]
    consumer, model = by_name["process llm.req.generate"], by_name[f"chat {MODEL}"]
    assert [s["kind"] for s in (server, producer, consumer, model)] == [
        "SPAN_KIND_SERVER",
        "SPAN_KIND_PRODUCER",
        "SPAN_KIND_CONSUMER",
        "SPAN_KIND_CLIENT",
    ]
    assert (producer["parent"], consumer["parent"], model["parent"]) == (
        server["id"],
        producer["id"],
        consumer["id"],
    )
    assert "gen_ai.usage.output_tokens: Int(8)" in model["text"]
    assert "service.name: Str(llmbus-test)" in receiver.output.read_text()


def test_tracing_is_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.build_provider("llmbus-test") is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.build_provider("llmbus-test") is None
