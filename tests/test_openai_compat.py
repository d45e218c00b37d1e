"""The official OpenAI SDK works against the edge unchanged, over real NATS."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from services.embedder.main import Embedder
from services.generator.main import Generator
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
async def sdk(edge: Edge, generator: Generator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


async def _native_tokens(edge: Edge, body: dict[str, object]) -> list[str]:
    async with (
        httpx.AsyncClient(base_url=edge.url) as http,
        http.stream("POST", "/v1/chat", json={**body, "stream": True}) as response,
    ):
        return [e.data["text"] async for e in sse_events(response) if e.event == "token"]


async def test_streaming_chat_matches_the_native_stream_token_for_token(
    sdk: openai.AsyncOpenAI, edge: Edge
) -> None:
    stream = await sdk.chat.completions.create(
        model="llama3.2:1b",
        messages=MESSAGES,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert pieces == await _native_tokens(edge, {"model": "llama3.2:1b", "messages": MESSAGES})
    assert finish == "stop"
    assert usage is not None
    assert usage.completion_tokens == len(pieces)


async def test_non_streaming_chat_and_completion(sdk: openai.AsyncOpenAI) -> None:
    chat = await sdk.chat.completions.create(model="llama3.2:1b", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert chat.object == "chat.completion"
    assert chat.choices[0].finish_reason == "length"
    assert len(chat.choices[0].message.content.split()) == 4  # type: ignore[union-attr]
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 4

    completion = await sdk.completions.create(model="llama3.2:1b", prompt="Once upon a time", max_tokens=3)
    assert completion.choices[0].text.strip()
    assert completion.choices[0].finish_reason == "length"


async def test_json_schema_response_format_reaches_the_backend(
    sdk: openai.AsyncOpenAI, fake_ollama: FakeOllama
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    chat = await sdk.chat.completions.create(
        model="llama3.2:1b",
        messages=MESSAGES,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    assert "city" in json.loads(chat.choices[0].message.content or "")
    calls = await fake_ollama.wait_calls(1, path="/api/chat")
    assert calls[-1].body["format"] == schema


async def test_sync_client_in_a_thread(edge: Edge, generator: Generator) -> None:
    def call() -> str:
        with openai.OpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0) as client:
            answer = client.chat.completions.create(model="llama3.2:1b", messages=MESSAGES)  # type: ignore[arg-type]
            return answer.choices[0].message.content or ""

    assert len((await asyncio.to_thread(call)).split()) == 8


async def test_errors_come_in_openai_shape(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.chat.completions.create(model="no-such-model:7b", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.chat.completions.create(model="llama3.2:1b", messages=[])
    assert bad.value.code == "bad_request"


async def test_disconnect_mid_stream_cancels_upstream(
    sdk: openai.AsyncOpenAI, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.05
    stream = await sdk.chat.completions.create(model="llama3.2:1b", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    call = (await fake_ollama.wait_disconnected(1, timeout=5))[0]
    assert call.tokens_sent < 50


async def _native_generate_tokens(edge: Edge, body: dict[str, object]) -> list[str]:
    async with (
        httpx.AsyncClient(base_url=edge.url) as http,
        http.stream("POST", "/v1/generate", json={**body, "stream": True}) as response,
    ):
        return [e.data["text"] async for e in sse_events(response) if e.event == "token"]


async def test_streaming_completion_matches_the_native_stream_token_for_token(
    sdk: openai.AsyncOpenAI, edge: Edge
) -> None:
    stream = await sdk.completions.create(model="llama3.2:1b", prompt="Once upon a time", stream=True)
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices and chunk.choices[0].text]
    assert pieces == await _native_generate_tokens(
        edge, {"model": "llama3.2:1b", "prompt": "Once upon a time"}
    )


async def test_sync_client_streams_the_native_tokens(edge: Edge, generator: Generator) -> None:
    def call() -> list[str]:
        with openai.OpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0) as client:
            stream = client.chat.completions.create(model="llama3.2:1b", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            return [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]

    pieces = await asyncio.to_thread(call)
    assert pieces == await _native_tokens(edge, {"model": "llama3.2:1b", "messages": MESSAGES})


# -- embeddings: the same bus path as POST /v1/embed

EMBED_MODEL = "nomic-embed-text"
TEXTS = ["the quick river", "a green stone"]


@pytest.fixture
async def embedder(settings: Settings) -> AsyncIterator[Embedder]:
    service = Embedder(settings)
    await service.start()
    yield service
    await service.stop(grace=0)


async def _native_vectors(edge: Edge, **body: object) -> list[list[float]]:
    async with httpx.AsyncClient(base_url=edge.url) as http:
        response = await http.post("/v1/embed", json={"model": EMBED_MODEL, "input": TEXTS, **body})
        vectors: list[list[float]] = response.json()["embeddings"]
        return vectors


async def test_embeddings_as_floats_match_the_native_embed_route(
    sdk: openai.AsyncOpenAI, edge: Edge, embedder: Embedder
) -> None:
    answer = await sdk.embeddings.create(model=EMBED_MODEL, input=TEXTS, encoding_format="float")
    assert [d.embedding for d in answer.data] == await _native_vectors(edge)
    assert [d.index for d in answer.data] == [0, 1]
    assert answer.model == EMBED_MODEL
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == 3 + 2 + 3 + 2  # the fake: words + 2
    # The SDK's default asks for base64 and decodes it: the same vectors.
    default = await sdk.embeddings.create(model=EMBED_MODEL, input=TEXTS)
    assert [d.embedding for d in default.data] == [d.embedding for d in answer.data]


async def test_embeddings_as_base64_are_little_endian_float32(
    sdk: openai.AsyncOpenAI, edge: Edge, embedder: Embedder
) -> None:
    answer = await sdk.embeddings.create(model=EMBED_MODEL, input="the quick river", encoding_format="base64")
    raw = base64.b64decode(answer.data[0].embedding)  # type: ignore[arg-type]
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == (await _native_vectors(edge))[0]


async def test_embeddings_pass_dimensions_to_the_backend(
    sdk: openai.AsyncOpenAI, embedder: Embedder, fake_ollama: FakeOllama
) -> None:
    answer = await sdk.embeddings.create(model=EMBED_MODEL, input="the quick river", dimensions=16)
    assert len(answer.data[0].embedding) == 16
    calls = await fake_ollama.wait_calls(1, path="/api/embed")
    assert calls[-1].body["dimensions"] == 16


async def test_embeddings_refuse_token_arrays_and_bad_formats_in_openai_shape(
    sdk: openai.AsyncOpenAI, embedder: Embedder
) -> None:
    with pytest.raises(openai.BadRequestError) as tokens:
        await sdk.embeddings.create(model=EMBED_MODEL, input=[[1, 2, 3]])
    assert tokens.value.code == "unsupported"  # a valid OpenAI input llmbus refuses, naming it
    assert tokens.value.param == "input"
    assert "token arrays" in tokens.value.message
    with pytest.raises(openai.BadRequestError) as fmt:
        await sdk.embeddings.create(model=EMBED_MODEL, input="x", encoding_format="hex")  # type: ignore[arg-type]
    assert fmt.value.code == "bad_request"
    assert fmt.value.param == "encoding_format"
    assert "`data`" not in fmt.value.message
    with pytest.raises(openai.BadRequestError) as empty:
        await sdk.embeddings.create(model=EMBED_MODEL, input=[])
    assert empty.value.code == "bad_request"
    with pytest.raises(openai.NotFoundError) as unknown:
        await sdk.embeddings.create(model="no-such-model:7b", input="x")
    assert unknown.value.code == "model_not_found"
