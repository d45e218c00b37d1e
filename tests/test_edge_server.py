"""The edge as it runs in production (`llmbus edge`, its own process and HTTP server) streams SSE
token by token and notices a client that hangs up, which cancels the model call upstream."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from contracts import ErrorCode
from services.edge.errors import error_response, with_retry_after
from services.generator.main import Generator
from services.runtime.settings import Settings
from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events

REPO = Path(__file__).resolve().parents[1]
BODY = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "write an essay"}], "stream": True}


@pytest.fixture
async def edge_process(settings: Settings, generator: Generator) -> AsyncIterator[str]:
    # Short HTTP read timeouts, so the slow-client tests take moments.
    settings = msgspec.structs.replace(settings, http_header_timeout_s=1.0, http_body_timeout_s=1.0)
    env = {**os.environ, **settings.to_env(), "LLMBUS_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "edge"], cwd=REPO, env=env)  # noqa: ASYNC220
    url = f"http://127.0.0.1:{settings.http_port}"
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            for _ in range(200):
                assert proc.poll() is None, "the edge exited at start-up"
                try:
                    if (await http.get(f"{url}/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def test_tokens_arrive_one_by_one_while_the_model_generates(
    edge_process: str, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 5
    fake_ollama.config.token_interval = 0.1
    arrivals: list[float] = []
    async with (
        httpx.AsyncClient(base_url=edge_process, timeout=10) as http,
        http.stream("POST", "/v1/chat", json=BODY) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        kinds = []
        async for event in sse_events(response):
            kinds.append(event.event)
            if event.event == "token":
                arrivals.append(time.monotonic())
    assert kinds == ["start", "token", "token", "token", "token", "token", "done"]
    # Relayed as they came, not buffered to the end: the first token arrived well before the last.
    assert arrivals[-1] - arrivals[0] > 0.25


async def test_client_hang_up_mid_stream_cancels_upstream(edge_process: str, fake_ollama: FakeOllama) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.05
    async with (
        httpx.AsyncClient(base_url=edge_process, timeout=10) as http,
        http.stream("POST", "/v1/chat", json=BODY) as response,
    ):
        seen = 0
        async for event in sse_events(response):
            seen += event.event == "token"
            if seen == 3:
                break
    [call] = await fake_ollama.wait_disconnected(1, timeout=5)
    assert call.tokens_sent < 20  # stopped within a few token intervals, not after 1000 tokens


async def test_client_hang_up_before_the_first_token_cancels_upstream(
    edge_process: str, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.first_token_delay = 30  # a model still loading
    async with (
        httpx.AsyncClient(base_url=edge_process, timeout=10) as http,
        http.stream("POST", "/v1/chat", json=BODY) as response,
    ):
        async for event in sse_events(response):
            if event.event == "start":
                break
    [call] = await fake_ollama.wait_disconnected(1, timeout=5)
    assert call.tokens_sent == 0


async def test_non_streaming_client_hang_up_cancels_upstream(
    edge_process: str, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.first_token_delay = 30
    async with httpx.AsyncClient(base_url=edge_process, timeout=10) as http:
        task = asyncio.create_task(http.post("/v1/chat", json={**BODY, "stream": False}))
        await fake_ollama.wait_calls(1, path="/api/chat")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await fake_ollama.wait_disconnected(1, timeout=5)


async def raw(url: str, data: bytes, *, wait: float = 5.0) -> tuple[bytes, float]:
    """Sends `data` on a fresh connection and reads until the server closes it (or `wait` passes)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(wait):
            answer = await reader.read()  # to EOF: the server closed the connection
    except TimeoutError:
        answer = b"(still open)"
    finally:
        writer.close()
    return answer, time.monotonic() - started


def error_of(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), msgspec.json.decode(body)["error"]


async def test_a_body_shorter_than_its_content_length_is_408_after_the_body_timeout(
    edge_process: str,
) -> None:
    partial = b'{"model": "llama3.2:1b", "messages": ['
    head = b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer, took = await raw(edge_process, head + b"Content-Length: 400\r\n\r\n" + partial)
    status, error = error_of(answer)
    assert status == 408 and error["code"] == "bad_request", answer
    assert 0.9 < took < 3.0


async def test_headers_that_never_end_are_408_after_the_header_timeout(edge_process: str) -> None:
    answer, took = await raw(edge_process, b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: a")
    status, error = error_of(answer)
    assert status == 408 and error["code"] == "bad_request", answer
    assert 0.9 < took < 3.0
    _, took = await raw(edge_process, b"")  # a connection that sends nothing at all
    assert took < 3.0


async def test_malformed_headers_get_a_json_400_with_a_code(edge_process: str) -> None:
    answer, _ = await raw(edge_process, b"GET /health/live HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n")
    status, error = error_of(answer)
    assert status == 400 and error["code"] == "bad_request" and error["message"], answer


def test_a_retry_after_of_its_own_is_kept() -> None:
    # An error event's own hint (say 5 s) is not replaced by the default; headers are a plain dict.
    response = with_retry_after(error_response(ErrorCode.QUEUE_FULL, "full", "r1", retry_after=5))
    assert response.headers["Retry-After"] == "5" and len(response.headers) == 2
    assert with_retry_after(error_response(ErrorCode.QUEUE_FULL, "full", "r1")).headers["Retry-After"] == "1"
