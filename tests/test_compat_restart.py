"""A worker that dies mid-answer of a prompt request makes the next attempt start over (`restart`).

OpenAI's and Ollama's formats have no restart event: a non-streamed answer holds only the new
attempt's text, and a stream goes on seamlessly when the new attempt repeats the text already sent,
or ends with `backend_error` when it differs. Never a duplicated or spliced answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import msgspec
import nats
import openai
import pytest
from nats.aio.client import Client

from contracts import Start, Token, subjects
from services.generator.main import Generator
from services.runtime import bus
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama

MODEL = "llama3.2:1b"
PROMPT = "name three rivers"
T = TypeVar("T")
_encode = msgspec.json.Encoder().encode


async def full_answer(fake: FakeOllama) -> str:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        body = {"model": MODEL, "prompt": PROMPT, "stream": False}
        return str((await http.post("/api/generate", json=body)).json()["response"])


@asynccontextmanager
async def edge_and_nats(settings: Settings) -> AsyncIterator[tuple[Edge, Client, Settings]]:
    """An edge whose queue redelivers within moments, and a NATS connection to play a worker."""
    settings = msgspec.structs.replace(settings, ack_wait_s=0.6)
    nc = await nats.connect(settings.nats_url)
    try:
        async with Edge(settings) as edge:
            yield edge, nc, settings
    finally:
        await nc.close()


async def after_a_crash(nc: Client, settings: Settings, pieces: list[str], request: Awaitable[T]) -> T:
    """Runs `request` while a worker takes it, streams `pieces` and dies; a real generator takes over."""
    js = nc.jetstream()
    await bus.ensure_consumer(js, settings, "generator", subjects.GENERATE_SUBJECTS)
    pull = await js.pull_subscribe_bind("generator", subjects.REQUEST_STREAM)
    answer = asyncio.ensure_future(request)
    [msg] = await pull.fetch(1, timeout=5)
    request_id = json.loads(msg.data)["id"]
    reply = subjects.event_subject(request_id)
    await nc.publish(reply, _encode(Start(seq=0, attempt=1, request_id=request_id, model=MODEL)))
    for seq, piece in enumerate(pieces, start=1):
        await nc.publish(reply, _encode(Token(seq=seq, attempt=1, text=piece)))
    await nc.flush()
    await pull.unsubscribe()  # no ack: JetStream redelivers after ack_wait
    generator = Generator(settings)
    await generator.start()
    try:
        async with asyncio.timeout(10):
            return await answer
    finally:
        await generator.stop(grace=0)


async def test_non_streamed_ollama_generate_drops_the_text_before_a_restart(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    want = await full_answer(fake_ollama)
    async with edge_and_nats(settings) as (edge, nc, fast), httpx.AsyncClient(base_url=edge.url) as http:
        body = {"model": MODEL, "prompt": PROMPT, "stream": False}
        response = await after_a_crash(
            nc, fast, ["lost ", "words "], http.post("/ollama/api/generate", json=body)
        )
    assert response.status_code == 200, response.text
    assert response.json()["response"] == want
    assert response.json()["done"] is True


async def test_non_streamed_openai_completion_drops_the_text_before_a_restart(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    want = await full_answer(fake_ollama)
    async with (
        edge_and_nats(settings) as (edge, nc, fast),
        openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0) as sdk,
    ):
        completion = await after_a_crash(
            nc, fast, ["lost ", "words "], sdk.completions.create(model=MODEL, prompt=PROMPT)
        )
    assert completion.choices[0].text == want
    assert completion.choices[0].finish_reason == "stop"


async def test_a_stream_continues_seamlessly_when_the_new_attempt_repeats_the_text_sent(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    want = await full_answer(fake_ollama)
    sent = want.split(" ")[:3]  # what the dead worker streamed: the answer's first words
    async with edge_and_nats(settings) as (edge, nc, fast), httpx.AsyncClient(base_url=edge.url) as http:

        async def stream() -> list[dict[str, Any]]:
            body = {"model": MODEL, "prompt": PROMPT}
            async with http.stream("POST", "/ollama/api/generate", json=body) as r:
                return [json.loads(line) async for line in r.aiter_lines() if line]

        lines = await after_a_crash(nc, fast, [word + " " for word in sent], stream())
    assert "".join(line["response"] for line in lines) == want  # once: nothing repeated
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"


async def drain(chunks: AsyncIterator[Any], pieces: list[str]) -> None:
    async for chunk in chunks:
        pieces.append(chunk.choices[0].text)


async def test_a_stream_ends_with_an_error_when_the_new_attempt_differs(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.01
    async with (
        edge_and_nats(settings) as (edge, nc, fast),
        openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0) as sdk,
    ):

        async def stream() -> list[str]:
            pieces: list[str] = []
            chunks = await sdk.completions.create(model=MODEL, prompt=PROMPT, stream=True)
            with pytest.raises(openai.APIError) as failed:
                await drain(chunks, pieces)
            assert "differs from the text already streamed" in failed.value.message
            return pieces

        pieces = await after_a_crash(nc, fast, ["lost ", "words "], stream())
    assert "".join(pieces) == "lost words "  # what the client had; nothing spliced onto it
    call = (await fake_ollama.wait_disconnected(1, timeout=5))[0]  # and the new attempt was cancelled
    assert call.tokens_sent < 100
