"""The official `ollama` Python client works against the edge's `/ollama` routes, over real NATS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import ollama
import pytest

from services.generator.main import Generator
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
async def client(edge: Edge, generator: Generator) -> AsyncIterator[ollama.AsyncClient]:
    api = ollama.AsyncClient(host=f"{edge.url}/ollama")
    yield api
    await api._client.aclose()


async def test_streaming_chat_matches_the_native_stream(client: ollama.AsyncClient, edge: Edge) -> None:
    pieces, last = [], None
    async for part in await client.chat(model="llama3.2:1b", messages=MESSAGES, stream=True):
        pieces.append(part.message.content)
        last = part
    assert last is not None
    assert last.done
    assert last.done_reason == "stop"
    assert last.eval_count == 8
    async with (
        httpx.AsyncClient(base_url=edge.url) as http,
        http.stream(
            "POST", "/v1/chat", json={"model": "llama3.2:1b", "messages": MESSAGES, "stream": True}
        ) as r,
    ):
        native = [e.data["text"] async for e in sse_events(r) if e.event == "token"]
    assert "".join(pieces) == "".join(native)


async def test_generate_non_streaming(client: ollama.AsyncClient) -> None:
    answer = await client.generate(model="llama3.2:1b", prompt="Once upon a time", options={"num_predict": 3})
    assert answer.done
    assert answer.done_reason == "length"
    assert len(answer.response.split()) == 3
    assert answer.total_duration is not None
    assert answer.total_duration > 0


async def test_unknown_options_are_ignored_like_ollama_does(
    client: ollama.AsyncClient, fake_ollama: FakeOllama
) -> None:
    answer = await client.generate(
        model="llama3.2:1b", prompt="x", options={"num_thread": 2, "temperature": 0.1}
    )
    assert answer.done
    calls = await fake_ollama.wait_calls(1, path="/api/generate")
    assert calls[-1].body["options"] == {"temperature": 0.1}


async def test_errors_come_in_ollama_shape(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat(model="no-such-model:7b", messages=MESSAGES)
    assert info.value.status_code == 404
    assert "not found" in info.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        await client.chat(model="llama3.2:1b", messages=[])
    assert bad.value.status_code == 400


async def test_disconnect_mid_stream_cancels_upstream(
    edge: Edge, generator: Generator, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.05
    body = {"model": "llama3.2:1b", "messages": MESSAGES}
    async with (
        httpx.AsyncClient(base_url=edge.url) as http,
        http.stream("POST", "/ollama/api/chat", json=body) as r,
    ):
        lines = 0
        async for _ in r.aiter_lines():
            lines += 1
            if lines == 3:
                break
    call = (await fake_ollama.wait_disconnected(1, timeout=5))[0]
    assert call.tokens_sent < 50


async def test_version_and_root(edge: Edge) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as http:
        assert (await http.get("/ollama/api/version")).json()["version"]
        assert (await http.get("/ollama/")).text == "Ollama is running"
