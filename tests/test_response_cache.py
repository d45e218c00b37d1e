"""The response cache (docs/cache.md) through the public APIs, with a real NATS and the fake Ollama:
a repeated reproducible request is replayed from the shared KV bucket without calling the model,
on any edge and after a restart, read by the official clients as a live answer; tenants never
share answers; sampled requests, errors and opted-out requests are never cached; entries expire;
a semantic hit needs the opt-in and a close enough question."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import ollama
import openai
import pytest

from services.classifier.main import Classifier
from services.embedder.main import Embedder
from services.generator.main import Generator
from services.ledger.main import LedgerService
from services.ledger.store import database_url
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events
from tests.test_admission import bearer, with_auth

MODEL = "llama3.2:1b"


def chat(text: str = "What is the capital of France?", **options: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "options": {"temperature": 0, **options},
    }


@pytest.fixture
def cached(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, response_cache="exact")


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[Edge, httpx.AsyncClient]]:
    async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        yield edge, http


def model_calls(fake: FakeOllama) -> int:
    return sum(1 for call in fake.calls if call.path in ("/api/chat", "/api/generate"))


async def test_a_repeated_request_is_replayed_without_calling_the_model(
    cached: Settings, generator: Generator, fake_ollama: FakeOllama
) -> None:
    async with running(cached) as (_, http):
        first = await http.post("/v1/chat", json=chat())
        assert first.status_code == 200, first.text
        assert first.headers["llmbus-cache"] == "miss"
        await asyncio.sleep(0.3)  # stored in the background after the answer
        second = await http.post("/v1/chat", json=chat())
        assert second.headers["llmbus-cache"] == "hit"
        assert model_calls(fake_ollama) == 1
        live, replay = first.json(), second.json()
        assert replay["text"] == live["text"] and replay["usage"] == live["usage"]
        assert replay["cached"] is True and "cached" not in live
        assert replay["request_id"] != live["request_id"]
        assert replay["timings"]["total_ms"] < 50  # a replay, not a model call

        # The same answer streamed: the same event types in order, `start` names this request.
        async with http.stream("POST", "/v1/chat", json=chat() | {"stream": True}) as response:
            assert response.headers["llmbus-cache"] == "hit"
            events = [event async for event in sse_events(response)]
        assert [e.event for e in events] == ["start", *["token"] * 8, "done"]
        assert events[0].data["request_id"] == response.headers["x-request-id"]
        assert [e.id for e in events] == [str(n) for n in range(len(events))]
        assert events[-1].data["cached"] is True
        assert "".join(e.data["text"] for e in events if e.event == "token") == live["text"]
        assert model_calls(fake_ollama) == 1

        # Anything that changes the answer is another key: options, the model, the text.
        await http.post("/v1/chat", json=chat(num_predict=3))
        await http.post("/v1/chat", json=chat("What is the capital of Spain?"))
        await http.post("/v1/generate", json={"model": MODEL, "prompt": "hi", "options": {"seed": 7}})
        assert model_calls(fake_ollama) == 4

        stats = (await http.get("/v1/cache")).json()
        assert stats["lookups"]["exact"] == {"hits": 2, "misses": 4, "hit_rate": 0.3333}
        await asyncio.sleep(0.3)
        assert (await http.get("/v1/cache")).json()["entries"] == 4
        metrics = (await http.get("/metrics")).text
        assert 'llmbus_cache_lookups_total{kind="exact",result="hit"} 2.0' in metrics
        assert "llmbus_cache_stored_bytes_total" in metrics


async def test_every_edge_shares_the_cache_and_it_outlives_an_edge_restart(
    cached: Settings, generator: Generator, fake_ollama: FakeOllama
) -> None:
    async with running(cached) as (_, http):
        assert (await http.post("/v1/chat", json=chat())).headers["llmbus-cache"] == "miss"
        await asyncio.sleep(0.3)
    other = msgspec.structs.replace(cached, http_port=free_port())  # another replica, a new process
    async with running(other) as (_, http):
        again = await http.post("/v1/chat", json=chat())
        assert again.headers["llmbus-cache"] == "hit"
        assert again.json()["cached"] is True
    assert model_calls(fake_ollama) == 1


async def test_the_official_clients_read_a_cached_replay_as_a_live_answer(
    cached: Settings, generator: Generator, fake_ollama: FakeOllama
) -> None:
    async with running(cached) as (edge, _):
        sdk = openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0)
        messages: Any = [{"role": "user", "content": "Say something"}]

        async def streamed() -> str:
            stream = await sdk.chat.completions.create(
                model=MODEL, messages=messages, temperature=0, stream=True
            )
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

        async def whole() -> tuple[str, str | None]:
            raw = await sdk.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, temperature=0
            )
            return raw.parse().choices[0].message.content or "", raw.headers.get("llmbus-cache")

        live = await streamed()
        await asyncio.sleep(0.3)
        assert await streamed() == live  # replayed: the SDK parses it as a live stream
        assert await whole() == (live, "hit")  # the same entry, rendered as one answer
        assert model_calls(fake_ollama) == 1

        api = ollama.AsyncClient(host=f"{edge.url}/ollama")
        ollama_messages = [{"role": "user", "content": "Say something else"}]
        parts = [
            part.message.content or ""
            async for part in await api.chat(
                model=MODEL, messages=ollama_messages, options={"temperature": 0}, stream=True
            )
        ]
        await asyncio.sleep(0.3)
        replayed = [
            part
            async for part in await api.chat(
                model=MODEL, messages=ollama_messages, options={"temperature": 0}, stream=True
            )
        ]
        assert "".join(part.message.content or "" for part in replayed) == "".join(parts)
        assert replayed[-1].done and replayed[-1].eval_count == 8
        assert model_calls(fake_ollama) == 2
        await sdk.close()
        await api._client.aclose()


async def test_tenants_never_share_answers_and_purge_only_their_own(
    cached: Settings, generator: Generator, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    async with running(with_auth(cached, tmp_path)) as (_, http):

        async def ask(who: str) -> str:
            response = await http.post("/v1/chat", json=chat(), headers=bearer(who))
            assert response.status_code == 200, response.text
            await asyncio.sleep(0.3)
            return response.headers["llmbus-cache"]

        assert [await ask("a"), await ask("b"), await ask("a"), await ask("b")] == [
            "miss",
            "miss",
            "hit",
            "hit",
        ]
        assert model_calls(fake_ollama) == 2

        mine = (await http.get("/v1/cache", headers=bearer("a"))).json()
        assert mine["tenant"] == "a" and mine["entries"] == 1
        everyone = (await http.get("/v1/cache?tenant=b", headers=bearer("a"))).json()
        assert everyone["tenant"] == "a"  # a tenant sees only its own, whatever it asks
        assert (await http.get("/v1/cache", headers=bearer("admin"))).json()["entries"] == 2

        purged = await http.delete("/v1/cache", headers=bearer("a"))
        assert purged.json() == {"purged": 1, "tenant": "a"}
        assert [await ask("a"), await ask("b")] == ["miss", "hit"]
        assert (await http.delete("/v1/cache", headers=bearer("admin"))).json()["tenant"] is None
        assert [await ask("a"), await ask("b")] == ["miss", "miss"]


async def test_sampled_opted_out_and_failed_requests_are_never_cached(
    cached: Settings, generator: Generator, fake_ollama: FakeOllama
) -> None:
    async with running(cached) as (_, http):
        sampled = chat() | {"options": {"temperature": 0.7}}
        default = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        for body, hdrs in [(sampled, {}), (default, {}), (chat("no cache"), {"Llmbus-Cache": "off"})]:
            for _ in range(2):
                response = await http.post("/v1/chat", json=body, headers=hdrs)
                assert response.status_code == 200 and "llmbus-cache" not in response.headers
                await asyncio.sleep(0.2)
        assert model_calls(fake_ollama) == 6
        assert (
            await http.post("/v1/chat", json=chat(), headers={"Llmbus-Cache": "maybe"})
        ).status_code == 400

        bad = await http.post("/v1/chat", json=chat() | {"cache": "maybe"})  # the body's field: 400, not 500
        assert bad.status_code == 400 and "`cache`" in bad.json()["error"]["message"]

        fake_ollama.config.fail_status, fake_ollama.config.fail_times = 400, 1
        failed = await http.post("/v1/chat", json=chat("fails once"))
        assert failed.status_code >= 400
        await asyncio.sleep(0.3)
        retried = await http.post("/v1/chat", json=chat("fails once"))
        assert retried.status_code == 200 and retried.headers["llmbus-cache"] == "miss"  # not the error
        await asyncio.sleep(0.3)
        assert (await http.post("/v1/chat", json=chat("fails once"))).headers["llmbus-cache"] == "hit"

        forced = await http.post("/v1/chat", json=sampled | {"cache": "force"})
        await asyncio.sleep(0.3)
        assert forced.headers["llmbus-cache"] == "miss"
        assert (await http.post("/v1/chat", json=sampled | {"cache": "force"})).headers[
            "llmbus-cache"
        ] == "hit"


async def test_an_entry_expires_after_its_ttl(
    cached: Settings, generator: Generator, fake_ollama: FakeOllama
) -> None:
    short = msgspec.structs.replace(cached, response_cache_ttl_s=1.0)
    async with running(short) as (_, http):
        await http.post("/v1/chat", json=chat())
        await asyncio.sleep(0.3)
        assert (await http.post("/v1/chat", json=chat())).headers["llmbus-cache"] == "hit"
        await asyncio.sleep(1.2)
        assert (await http.post("/v1/chat", json=chat())).headers["llmbus-cache"] == "miss"
        assert model_calls(fake_ollama) == 2


async def test_the_ledger_records_a_hit_as_a_cache_answer(
    cached: Settings, generator: Generator, tmp_path: Path
) -> None:
    settings = msgspec.structs.replace(cached, database_url=database_url("", str(tmp_path / "data")))
    service = LedgerService(settings)
    await service.start()
    try:
        async with running(settings) as (_, http):
            live = await http.post("/v1/chat", json=chat())
            await asyncio.sleep(0.3)
            hit = await http.post("/v1/chat", json=chat())
            assert hit.headers["llmbus-cache"] == "hit"
            rows: dict[str, Any] = {}
            for _ in range(100):
                items = (await http.get("/v1/history")).json()["items"]
                rows = {item["request_id"]: item for item in items}
                if len(rows) == 2:
                    break
                await asyncio.sleep(0.1)
        first, replayed = rows[live.headers["x-request-id"]], rows[hit.headers["x-request-id"]]
        assert first["host"].startswith("127.0.0.1:") and first["completion_tokens"] > 0
        assert replayed["host"] == "cache" and replayed["outcome"] == "done"
        assert replayed["model"] == MODEL and replayed["total_tokens"] == 0  # no model ran: no cost
    finally:
        await service.stop()


async def test_a_semantic_hit_needs_the_opt_in_a_close_question_and_the_same_tenant(
    cached: Settings, generator: Generator, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    embedder = Embedder(cached)
    await embedder.start()
    try:
        async with running(with_auth(cached, tmp_path)) as (_, http):

            async def ask(text: str, who: str = "a", mode: str = "semantic", **more: Any) -> str:
                hdrs = bearer(who) | {"Llmbus-Cache": mode}
                response = await http.post("/v1/chat", json=chat(text) | more, headers=hdrs)
                assert response.status_code == 200, response.text
                await asyncio.sleep(0.3)
                return str(response.headers.get("llmbus-cache", "not cacheable"))

            assert await ask("What is the capital of France?") == "miss"
            assert await ask("what is the capital of france") == "semantic"  # same words
            assert await ask("what is the capital of france", mode="exact") == "miss"  # no opt-in
            assert await ask("Tell me a story about a dragon") == "miss"  # far from it
            assert await ask("what is the capital of france", who="b") == "miss"  # another tenant
            sampled: dict[str, Any] = {"options": {"temperature": 0.5}}
            assert await ask("What is the capital of France", **sampled) == "not cacheable"
            assert model_calls(fake_ollama) == 5
            stats = (await http.get("/v1/cache", headers=bearer("a"))).json()
            assert stats["lookups"]["semantic"]["hits"] == 1
    finally:
        await embedder.stop(grace=0)


async def test_a_tenants_cache_setting_applies_to_its_requests_and_a_header_overrides_it(
    cached: Settings, generator: Generator, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    async with running(with_auth(cached, tmp_path, a='cache = "off"')) as (_, http):
        for who, hdrs in [("a", {}), ("a", {}), ("b", {}), ("b", {}), ("a", {"Llmbus-Cache": "exact"})]:
            await http.post("/v1/chat", json=chat(), headers=bearer(who) | hdrs)
            await asyncio.sleep(0.3)
        again = await http.post("/v1/chat", json=chat(), headers=bearer("a") | {"Llmbus-Cache": "exact"})
        assert again.headers["llmbus-cache"] == "hit"
        assert model_calls(fake_ollama) == 4  # a twice (off), b once, a once more (its first stored)


ROUTES = """
[router]
default = "chat"
[classify]
llm_model = "llama3.2:1b"
[[route]]
name = "chat"
model = "llama3.2:1b"
description = "everything else"
[[route]]
name = "faq"
model = "llama3.2:1b"
description = "the questions everyone asks"
examples = ["what are your opening hours"]
cache = "exact"
"""


async def test_a_routes_cache_setting_applies_to_its_route_name_requests(
    settings: Settings, generator: Generator, fake_ollama: FakeOllama, tmp_path: Path
) -> None:

    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES)
    off = msgspec.structs.replace(settings, routes_file=str(routes))  # the edge's default: off
    classifier = Classifier(off)
    await classifier.start()
    try:
        async with running(off) as (_, http):
            answers = []
            for model in ("route:faq", "route:faq", "route:chat", "route:chat"):
                response = await http.post("/v1/chat", json=chat() | {"model": model})
                assert response.status_code == 200, response.text
                answers.append(response.headers.get("llmbus-cache"))
                await asyncio.sleep(0.3)
            assert answers == ["miss", "hit", None, None]
            assert model_calls(fake_ollama) == 3
            assert (await http.post("/v1/chat", json=chat() | {"model": "route:faq"})).json()["routed"][
                "route"
            ] == "faq"
    finally:
        await classifier.stop(grace=0)
