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
import pytest

from services.generator.main import Generator
from services.runtime.settings import Settings
from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events

REPO = Path(__file__).resolve().parents[1]
BODY = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "write an essay"}], "stream": True}


@pytest.fixture
async def edge_process(settings: Settings, generator: Generator) -> AsyncIterator[str]:
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
