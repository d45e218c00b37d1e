"""Queueing you can see: `GET /v1/queue`, `llmbus queue` and the `queued` event (native SSE, OpenAI's
SSE comments, nothing on Ollama's NDJSON), against a generator with one slot and a slow fake Ollama."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import ollama
import openai
import pytest

from contracts.queue import QueueReport
from services.edge.tenants import hash_key
from services.generator.main import Generator
from services.ledger.main import LedgerService
from services.ledger.store import database_url
from services.runtime.settings import Settings
from tests import queue_burst
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama

MODEL = "llama3.2:1b"


@pytest.fixture
def slow(settings: Settings, fake_ollama: FakeOllama) -> Settings:
    """One generation at a time, each ~1.2 s: a queue forms behind it."""
    fake_ollama.config.first_token_delay = 1.0
    fake_ollama.config.token_interval = 0.05
    fake_ollama.config.tokens = 4
    return msgspec.structs.replace(settings, concurrency=1, request_timeout_s=60.0)


@pytest.fixture
async def stack(slow: Settings) -> AsyncIterator[tuple[Edge, httpx.AsyncClient]]:
    gen = Generator(slow)
    await gen.start()
    try:
        async with Edge(slow) as edge, httpx.AsyncClient(base_url=edge.url, timeout=30) as http:
            yield edge, http
    finally:
        await gen.stop(grace=0)


async def events(response: httpx.Response) -> list[tuple[str, dict[str, object]]]:
    """The SSE events of a native stream: (type, data)."""
    out: list[tuple[str, dict[str, object]]] = []
    kind = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
    return out


def body(i: int) -> dict[str, object]:
    return {"model": MODEL, "prompt": f"request {i}", "stream": True}


def submit(http: httpx.AsyncClient, i: int) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
    """Request `i`, streamed; entered once the edge has queued it (the response's headers)."""
    return http.stream("POST", "/v1/generate", json=body(i))


async def test_a_waiting_request_streams_its_place_before_start(
    stack: tuple[Edge, httpx.AsyncClient],
) -> None:
    _, http = stack
    async with contextlib.AsyncExitStack() as opened:
        streams = [
            await opened.enter_async_context(http.stream("POST", "/v1/generate", json=body(i)))
            for i in range(3)
        ]
        seen = await asyncio.gather(*(events(s) for s in streams))
    first, second, third = ([kind for kind, _ in stream] for stream in seen)
    assert "queued" not in first  # a free slot took it at once
    for kinds in (second, third):
        assert kinds[0] == "queued" and "start" in kinds and kinds[-1] == "done"
        assert set(kinds[: kinds.index("start")]) == {"queued"}  # only before start
    queued = [data for kind, data in seen[2] if kind == "queued"]
    assert queued[0]["position"] == 2 and queued[0]["ahead"] == 1 and queued[0]["running"] == 1
    assert queued[0]["model"] == MODEL and queued[0]["waiting"] == 2 and queued[0]["exact"] is True
    assert queued[-1]["position"] == 1  # it moved up once the first ended
    assert "seq" in queued[0] and queued[0]["seq"] == -1


async def test_the_queue_report_per_model(stack: tuple[Edge, httpx.AsyncClient]) -> None:
    _, http = stack
    async with contextlib.AsyncExitStack() as opened:
        streams = [
            await opened.enter_async_context(http.stream("POST", "/v1/generate", json=body(i)))
            for i in range(4)
        ]
        await asyncio.sleep(0.4)  # the first one is running
        answer = await http.get("/v1/queue")
        assert answer.status_code == 200, answer.text
        report = msgspec.json.decode(answer.content, type=QueueReport)
        await asyncio.gather(*(events(s) for s in streams))
    (row,) = [m for m in report.models if m.model == MODEL]
    assert (row.waiting, row.running) == (3, 1)
    assert (row.consumer, row.generators, row.concurrency) == ("generator", 1, 1)
    assert row.oldest_waiting_s is not None and 0.2 < row.oldest_waiting_s < 5
    assert row.accepted_per_min == 4
    assert row.completed_per_min is None  # no ledger in this test
    (consumer,) = [c for c in report.consumers if c.name == "generator"]
    assert (consumer.waiting, consumer.running, consumer.concurrency) == (3, 1, 1)


async def test_official_clients_tolerate_a_waiting_stream(stack: tuple[Edge, httpx.AsyncClient]) -> None:
    edge, http = stack
    # OpenAI's SSE: the place comes as comments, which its client skips.
    async with http.stream("POST", "/v1/generate", json=body(0)) as blocker:
        raw = await http.send(
            http.build_request(
                "POST",
                "/openai/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
            ),
            stream=True,
        )
        text = (await raw.aread()).decode()
        await raw.aclose()
        await events(blocker)
    assert ": queued position=1 ahead=0 running=1" in text and text.rstrip().endswith("data: [DONE]")

    async def openai_answer() -> str:
        async with openai.AsyncOpenAI(
            base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0
        ) as sdk:
            stream = await sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def ollama_answer() -> str:
        api = ollama.AsyncClient(host=f"{edge.url}/ollama")
        try:
            parts = await api.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
            return "".join([part.message.content or "" async for part in parts])
        finally:
            await api._client.aclose()

    async with http.stream("POST", "/v1/generate", json=body(1)) as blocker:
        answers = await asyncio.gather(openai_answer(), ollama_answer(), events(blocker))
    assert answers[0] and answers[1]  # both clients read whole answers through the wait


async def test_llmbus_queue_prints_a_table(
    stack: tuple[Edge, httpx.AsyncClient], slow: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from services import queue_cli

    _, http = stack
    async with contextlib.AsyncExitStack() as opened:
        streams = [
            await opened.enter_async_context(http.stream("POST", "/v1/generate", json=body(i)))
            for i in range(2)
        ]
        await asyncio.sleep(0.3)
        code = await queue_cli.show(slow)
        await asyncio.gather(*(events(s) for s in streams))
    assert code == 0
    out = capsys.readouterr().out
    assert "model" in out and "waiting" in out and MODEL in out


@pytest.mark.parametrize("mixed", [False, True])
async def test_the_position_under_a_burst_in_known_order(
    settings: Settings, fake_ollama: FakeOllama, mixed: bool
) -> None:
    """tests/queue_burst.py, small: every waiting request's first `queued` event is right, and
    each event matches the truth of the last look's age (`python -m tests.queue_burst 20`)."""
    fake_ollama.config.first_token_delay = 0.6
    fake_ollama.config.tokens = 2
    result = await queue_burst.measure(settings, 5, mixed=mixed)
    assert result.first_events == 4 and result.first_right == 4, result.lines()
    assert result.right_recently == result.events, result.lines()


async def test_completed_per_minute_comes_from_the_ledger_and_a_tenant_sees_its_models(
    settings: Settings, tmp_path: Path
) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        f'[tenants.a]\nkeys = ["{hash_key("key-a")}"]\nmodels = ["qwen*"]\n'
        f'[tenants.ops]\nkeys = ["{hash_key("key-ops")}"]\nadmin = true\n'
    )
    settings = msgspec.structs.replace(
        settings,
        auth="on",
        tenants_file=str(tenants),
        database_url=database_url("", str(tmp_path / "data")),
    )
    gen = Generator(settings)
    await gen.start()
    ledger = LedgerService(settings)
    await ledger.start()
    try:
        async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
            ops = {"Authorization": "Bearer key-ops"}
            for model in (MODEL, MODEL, "qwen2.5:0.5b"):
                answer = await http.post("/v1/generate", json={"model": model, "prompt": "hi"}, headers=ops)
                assert answer.status_code == 200, answer.text
            async with asyncio.timeout(15):  # the ledger commits in batches
                while True:
                    report = msgspec.json.decode(
                        (await http.get("/v1/queue", headers=ops)).content, type=QueueReport
                    )
                    done = {m.model: m.completed_per_min for m in report.models}
                    if done.get(MODEL) == 2 and done.get("qwen2.5:0.5b") == 1:
                        break
                    await asyncio.sleep(0.2)
            assert {m.model: m.accepted_per_min for m in report.models} == {MODEL: 2, "qwen2.5:0.5b": 1}
            assert report.consumers  # an admin sees the consumers
            mine = (await http.get("/v1/queue", headers={"Authorization": "Bearer key-a"})).json()
            assert [m["model"] for m in mine["models"]] == ["qwen2.5:0.5b"] and mine["consumers"] == []
            assert (await http.get("/v1/queue")).status_code == 401
    finally:
        await ledger.stop()
        await gen.stop(grace=0)
