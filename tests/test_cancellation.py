"""A client that goes away cancels the work upstream, before and after the first token."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events

BODY = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "write an essay"}], "stream": True}


async def test_client_disconnect_cancels_upstream_within_one_token(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.05
    async with client.stream("POST", "/v1/chat", json=BODY) as response:
        seen = 0
        async for event in sse_events(response):
            seen += event.event == "token"
            if seen == 3:
                break
    hung_up = time.monotonic()
    call = (await fake_ollama.wait_disconnected(1, timeout=5))[0]
    assert call.disconnected
    assert call.tokens_sent < 10  # stopped within about one token interval, not after 1000 tokens
    assert time.monotonic() - hung_up < 1.0


async def test_client_disconnect_cancels_upstream_before_first_token(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.first_token_delay = 30  # a model still loading, or a long prompt being evaluated
    async with client.stream("POST", "/v1/chat", json=BODY) as response:
        async for event in sse_events(response):
            if event.event == "start":
                break
    hung_up = time.monotonic()
    call = (await fake_ollama.wait_disconnected(1, timeout=5))[0]
    assert call.tokens_sent == 0
    assert time.monotonic() - hung_up < 1.0


async def test_non_streaming_client_disconnect_cancels_upstream(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.first_token_delay = 30
    body = {**BODY, "stream": False}
    task = asyncio.create_task(client.post("/v1/chat", json=body))
    await fake_ollama.wait_calls(1, path="/api/chat")
    task.cancel()
    await fake_ollama.wait_disconnected(1, timeout=5)


async def test_compat_stream_client_gone_before_first_token_cancels_upstream(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    """OpenAI's and Ollama's streams hold their status until the model's first word (an error
    before it is a status): a client that leaves meanwhile still cancels the work upstream."""
    fake_ollama.config.first_token_delay = 30
    for n, path in enumerate(("/openai/v1/chat/completions", "/ollama/api/chat"), start=1):
        task = asyncio.create_task(client.post(path, json=BODY))
        await fake_ollama.wait_calls(n, path="/api/chat")
        task.cancel()
        hung_up = time.monotonic()
        call = (await fake_ollama.wait_disconnected(n, timeout=5))[-1]
        assert call.tokens_sent == 0
        assert time.monotonic() - hung_up < 1.0
