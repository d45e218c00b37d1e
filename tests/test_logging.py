"""Structured logs: JSON lines, each naming the request and trace it concerns, never its prompt."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.runtime import logs
from tests.fakes.ollama import FakeOllama
from tests.sse import collect

MODEL = "llama3.2:1b"
SECRET_PROMPT = "my bank PIN is 9274-unique-prompt-text"


class Lines:
    """Every record the root logger emits, formatted as the services format it."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    def parsed(self) -> list[dict[str, object]]:
        raw = self.buffer.getvalue().splitlines()
        return [json.loads(line) for line in raw]  # one JSON object per line, nothing else

    def text(self) -> str:
        return self.buffer.getvalue()


@pytest.fixture
def lines() -> Iterator[Lines]:
    captured = Lines()
    handler = logging.StreamHandler(captured.buffer)
    handler.setFormatter(logs.JsonFormatter("llmbus-test"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # request lines of the worker are debug; prompts must not leak there either
    yield captured
    root.removeHandler(handler)
    root.setLevel(level)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


async def test_request_lines_carry_request_and_trace_ids_and_no_prompt(
    lines: Lines, spans: InMemorySpanExporter, client: httpx.AsyncClient
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": SECRET_PROMPT}], "stream": True}
    async with client.stream("POST", "/v1/chat", json=body) as response:
        request_id = response.headers["x-request-id"]
        await collect(response)
    [server] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.context is not None
    trace_id = format(server.context.trace_id, "032x")

    def mine() -> list[dict[str, object]]:
        """The services' lines that mention the request (the test's own HTTP client logs too)."""
        ours = [line for line in lines.parsed() if str(line["logger"]).startswith(("llmbus", "services"))]
        return [line for line in ours if request_id in json.dumps(line)]

    # Both lines come just after the last event, maybe after the client has read it.
    await until(lambda: {"llmbus.edge", "llmbus.worker"} <= {str(line["logger"]) for line in mine()})
    about_it = mine()
    assert {"llmbus.edge", "llmbus.worker"} <= {str(line["logger"]) for line in about_it}
    for line in about_it:  # any line that mentions the request names it, and its trace
        assert line.get("request_id") == request_id, line
        assert line.get("trace_id") == trace_id, line
        assert line["service"] == "llmbus-test"
    [finished] = [line for line in about_it if line["msg"] == "request finished"]
    assert (finished["endpoint"], finished["model"], finished["code"]) == ("/v1/chat", MODEL, "ok")
    assert finished["status"] == 200 and isinstance(finished["duration_ms"], float)
    assert SECRET_PROMPT not in lines.text()


async def test_failed_request_is_logged_with_its_code_and_without_its_prompt(
    lines: Lines, client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.fail_status = 404
    response = await client.post("/v1/generate", json={"model": MODEL, "prompt": SECRET_PROMPT})
    request_id = response.headers["x-request-id"]
    assert response.json()["error"]["code"] == "model_not_found"

    def finished_lines() -> list[dict[str, object]]:
        return [
            line
            for line in lines.parsed()
            if line.get("request_id") == request_id and line["msg"] == "request finished"
        ]

    await until(lambda: bool(finished_lines()))
    [finished] = finished_lines()
    assert (finished["code"], finished["status"]) == ("model_not_found", 404)
    assert "trace_id" not in finished  # tracing is off: no made-up ids
    assert SECRET_PROMPT not in lines.text()


async def test_an_idempotency_key_is_the_request_id_in_the_logs(
    lines: Lines, client: httpx.AsyncClient
) -> None:
    key = f"client-key-{uuid.uuid4().hex[:12]}"
    response = await client.post(
        "/v1/generate", json={"model": MODEL, "prompt": "Hi"}, headers={"Idempotency-Key": key}
    )
    assert response.headers["x-request-id"] == key

    def finished() -> list[dict[str, object]]:
        return [line for line in lines.parsed() if line["msg"] == "request finished"]

    await until(lambda: bool(finished()))
    assert [line["request_id"] for line in finished()] == [key]


def test_a_traceback_stays_on_one_line_with_its_request_id(lines: Lines) -> None:
    log = logging.getLogger("llmbus.test")
    with logs.request_scope("req-123456"):
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("request %s failed", "req-123456")
    log.info("after the request")
    failed, after = lines.parsed()  # two records, two lines, although the traceback has many
    assert failed["request_id"] == "req-123456" and failed["level"] == "error"
    assert "ValueError: boom\nsecond line" in str(failed["exc"])
    assert "request_id" not in after


def test_credentials_in_urls_are_not_logged(lines: Lines) -> None:
    logging.getLogger("llmbus.test").warning("cannot reach nats://llmbus:s3cr3t@nats.internal:4222")
    [line] = lines.parsed()
    assert line["msg"] == "cannot reach nats://***@nats.internal:4222"


def test_setup_logging_writes_json_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    level = root.level
    try:
        logs.setup("info", "llmbus-generator")
        logging.getLogger("llmbus.generator").info("model backend: %s", "ollama")
        logging.getLogger("llmbus.generator").debug("not at info level")
    finally:
        if logs._handler is not None:
            root.removeHandler(logs._handler)
            logs._handler = None
        root.setLevel(level)
    [line] = [json.loads(raw) for raw in capsys.readouterr().err.splitlines()]
    assert line["msg"] == "model backend: ollama"
    assert (line["level"], line["service"], line["logger"]) == (
        "info",
        "llmbus-generator",
        "llmbus.generator",
    )


def test_text_format_is_one_short_line_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    level = root.level
    try:
        logs.setup("info", "llmbus-up", "text")
        logging.getLogger("llmbus.up").warning("edge ready at %s", "http://127.0.0.1:8080")
    finally:
        if logs._handler is not None:
            root.removeHandler(logs._handler)
            logs._handler = None
        root.setLevel(level)
    [line] = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d warning llmbus-up: edge ready at http://127\.0\.0\.1:8080", line)
