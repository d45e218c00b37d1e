"""The embedder over real NATS and the fake Ollama: batching, order, the cache, failures, limits."""

from __future__ import annotations

import asyncio
import json
import uuid
from array import array
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import nats
import pytest

from contracts import headers, subjects
from services.embedder import matryoshka
from services.embedder.main import Embedder
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama

MODEL = "nomic-embed-text"
NEVER_MS = 60_000.0  # a batch that only its size can flush: merging is then deterministic


@asynccontextmanager
async def stack(settings: Settings, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An embedder and an edge with these settings, and an HTTP client for the edge."""
    async with running(settings, **overrides) as (http, _):
        yield http


@asynccontextmanager
async def running(settings: Settings, **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Embedder]]:
    configured = msgspec.structs.replace(settings, **overrides)
    embedder = Embedder(configured)
    await embedder.start()
    try:
        async with Edge(configured) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
            yield http, embedder
    finally:
        await embedder.stop(grace=0)


async def expected(fake: FakeOllama, texts: list[str], dimensions: int | None = None) -> list[list[float]]:
    """What Ollama answers for `texts`, at the float32 precision llmbus answers with."""
    body: dict[str, Any] = {"model": MODEL, "input": texts}
    if dimensions:
        body["dimensions"] = dimensions
    async with httpx.AsyncClient(base_url=fake.url) as http:
        vectors = (await http.post("/api/embed", json=body)).json()["embeddings"]
    fake.reset()  # these calls are not the system's
    return [array("f", vector).tolist() for vector in vectors]


def embed_calls(fake: FakeOllama) -> list[list[str]]:
    """The inputs of every backend embed call so far."""
    return [call.body["input"] for call in fake.calls if call.path == "/api/embed"]


async def test_embed_answers_vectors_in_input_order_with_usage_and_timings(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    texts = ["the quick river", "a green stone", "silver window light"]
    want = await expected(fake_ollama, texts)
    async with stack(settings) as http:
        response = await http.post("/v1/embed", json={"model": MODEL, "input": texts})
        single = await http.post("/v1/embed", json={"model": MODEL, "input": "a lone sentence"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["embeddings"] == want
    assert body["model"] == MODEL
    assert body["request_id"] == response.headers["X-Request-Id"]
    assert body["usage"] == {"prompt_tokens": 9 + 3 * 2, "cached": 0}  # the fake: words + 2 per input
    assert body["timings"]["total_ms"] >= body["timings"]["backend_ms"] > 0
    assert single.status_code == 200
    assert len(single.json()["embeddings"]) == 1


async def test_concurrent_requests_share_one_backend_call_and_each_gets_its_own_vectors_in_order(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    requests = [
        ["alpha one"],
        ["bravo two", "charlie three"],
        ["delta", "echo", "foxtrot"],
        ["golf", "hotel"],
    ]
    wants = [await expected(fake_ollama, texts) for texts in requests]
    async with stack(settings, embed_max_batch=8, embed_max_wait_ms=NEVER_MS) as http:
        answers = await asyncio.gather(
            *(http.post("/v1/embed", json={"model": MODEL, "input": texts}) for texts in requests)
        )
    assert [answer.json()["embeddings"] for answer in answers] == wants
    [merged] = embed_calls(fake_ollama)
    assert sorted(merged) == sorted(text for texts in requests for text in texts)
    # The call's token count is split between the requesters, adding up to what the backend said.
    assert sum(answer.json()["usage"]["prompt_tokens"] for answer in answers) == 11 + 2 * 8


async def test_requests_arriving_while_a_call_runs_go_together_in_the_next_call(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.embed_call_cost, fake_ollama.config.parallel = 0.001, 0  # calls wait for a slot
    async with running(settings, embed_max_wait_ms=0, embed_max_calls=1, embed_cache_ttl_s=0) as (
        http,
        embedder,
    ):

        async def embed(text: str) -> httpx.Response:
            return await http.post("/v1/embed", json={"model": MODEL, "input": text})

        first = asyncio.create_task(embed("first"))
        await fake_ollama.wait_calls(1, "/api/embed")  # in flight, held by the fake
        later = [asyncio.create_task(embed(text)) for text in ("second", "third", "fourth")]
        async with asyncio.timeout(5):
            while embedder.batcher.waiting < 3:
                await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=fake_ollama.url) as control:
            await control.post("/_fake/config", json={"parallel": None})  # let the calls run
        answers = await asyncio.gather(first, *later)
    assert all(answer.status_code == 200 for answer in answers)
    assert [sorted(call) for call in embed_calls(fake_ollama)] == [["first"], ["fourth", "second", "third"]]


async def test_without_batching_each_request_is_its_own_call_and_a_big_one_is_split(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    texts = ["one", "two", "three", "four", "five"]
    want = await expected(fake_ollama, texts)
    async with stack(settings, embed_batching=False, embed_max_batch=2) as http:
        big, *singles = await asyncio.gather(
            http.post("/v1/embed", json={"model": MODEL, "input": texts}),
            http.post("/v1/embed", json={"model": MODEL, "input": "six"}),
            http.post("/v1/embed", json={"model": MODEL, "input": "seven"}),
        )
    assert big.json()["embeddings"] == want
    assert all(single.status_code == 200 for single in singles)
    assert sorted(embed_calls(fake_ollama)) == [
        ["five"],
        ["one", "two"],
        ["seven"],
        ["six"],
        ["three", "four"],
    ]


async def test_cache_hit_never_reaches_the_backend(settings: Settings, fake_ollama: FakeOllama) -> None:
    async with stack(settings) as http:
        first = await http.post("/v1/embed", json={"model": MODEL, "input": ["red kite", "blue lotus"]})
        again = await http.post("/v1/embed", json={"model": MODEL, "input": ["blue lotus", "red kite"]})
        assert len(embed_calls(fake_ollama)) == 1
        mixed = await http.post(
            "/v1/embed", json={"model": MODEL, "input": ["red kite", "new amber", "red kite"]}
        )
        other_size = await http.post(
            "/v1/embed", json={"model": MODEL, "input": "red kite", "dimensions": 16}
        )
    red, blue = first.json()["embeddings"]
    assert again.json()["embeddings"] == [blue, red]
    assert again.json()["usage"] == {"prompt_tokens": 0, "cached": 2}
    assert again.json()["timings"]["backend_ms"] == 0
    assert mixed.json()["embeddings"][0] == mixed.json()["embeddings"][2] == red
    assert mixed.json()["usage"]["cached"] == 2
    # Only the new text went to the backend; `dimensions` is part of the key, so it is a miss.
    assert embed_calls(fake_ollama)[1:] == [["new amber"], ["red kite"]]
    assert len(other_size.json()["embeddings"][0]) == 16


async def test_a_vector_cached_by_one_replica_is_a_hit_for_the_next(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    async with stack(settings) as http:
        first = await http.post("/v1/embed", json={"model": MODEL, "input": "shared by replicas"})
    async with stack(settings) as http:  # a new embedder process, same NATS
        second = await http.post("/v1/embed", json={"model": MODEL, "input": "shared by replicas"})
    assert second.json()["embeddings"] == first.json()["embeddings"]
    assert second.json()["usage"]["cached"] == 1
    assert len(embed_calls(fake_ollama)) == 1


async def test_one_input_over_the_context_fails_only_its_requester_in_a_merged_batch(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    good = [["good one"], ["good two"], ["good three"]]
    wants = [await expected(fake_ollama, texts) for texts in good]
    too_long = "word " * 5000  # 5002 tokens: over the fake's 4096-token context
    async with stack(settings, embed_max_batch=4, embed_max_wait_ms=NEVER_MS) as http:
        answers = await asyncio.gather(
            *(
                http.post("/v1/embed", json={"model": MODEL, "input": texts, "truncate": False})
                for texts in [*good, [too_long]]
            )
        )
    *fine, bad = answers
    assert [answer.json()["embeddings"] for answer in fine] == wants
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "bad_request"
    assert "context length" in bad.json()["error"]["message"]
    assert len(embed_calls(fake_ollama)[0]) == 4  # they did share the first call


async def test_a_backend_failure_every_input_shares_is_not_retried_per_requester(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    async with stack(settings, embed_max_batch=3, embed_max_wait_ms=NEVER_MS) as http:
        answers = await asyncio.gather(
            *(http.post("/v1/embed", json={"model": "no-such-embedder", "input": t}) for t in "abc")
        )
    assert {answer.json()["error"]["code"] for answer in answers} == {"model_not_found"}
    assert {answer.status_code for answer in answers} == {404}
    assert len(embed_calls(fake_ollama)) == 1


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"model": MODEL, "input": ["x"] * 5}, 413, "request_too_large", "5 inputs"),
        (
            {"model": MODEL, "input": ["ok", "y" * 101]},
            400,
            "prompt_too_large",
            "`input[1]` has 101 characters",
        ),
        ({"model": MODEL, "input": []}, 400, "bad_request", "must not be empty"),
        ({"model": MODEL, "input": ["ok", ""]}, 400, "bad_request", "`input[1]` is empty"),
        ({"model": MODEL, "input": "x", "dimensions": 0}, 400, "bad_request", "`dimensions`"),
        ({"model": MODEL, "input": "x", "surprise": 1}, 400, "bad_request", "surprise"),
        ({"model": MODEL, "input": [1, 2]}, 400, "bad_request", "input"),
        ({"model": "a b*>", "input": "x"}, 400, "bad_request", "invalid model name"),
    ],
)
async def test_limits_and_bad_input_are_refused_before_the_bus(
    settings: Settings, fake_ollama: FakeOllama, body: dict[str, Any], status: int, code: str, says: str
) -> None:
    async with stack(settings, embed_max_inputs=4, embed_max_input_chars=100) as http:
        response = await http.post("/v1/embed", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert says in error["message"]
    assert embed_calls(fake_ollama) == []


async def _publish(nc: nats.NATS, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Publishes like any backend would and returns the request's events up to the terminal one."""
    events = await nc.subscribe(subjects.event_subject(request["id"]))
    await nc.jetstream().publish(
        subjects.embed_subject(request["model"]),
        json.dumps(request).encode(),
        headers={headers.MSG_ID: request["id"], headers.REPLY: subjects.event_subject(request["id"])},
    )
    received = []
    async with asyncio.timeout(10):
        async for msg in events.messages:
            received.append(json.loads(msg.data))
            if received[-1]["type"] in ("embeddings", "error"):
                break
    await events.unsubscribe()
    return received


async def test_a_request_published_straight_on_nats_gets_an_embeddings_event(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    texts = ["straight", "from another backend"]
    want = await expected(fake_ollama, texts)
    async with stack(settings, embed_max_inputs=2):
        nc = await nats.connect(settings.nats_url)
        try:
            ok = await _publish(nc, {"id": uuid.uuid4().hex, "model": MODEL, "input": texts})
            too_many = await _publish(nc, {"id": uuid.uuid4().hex, "model": MODEL, "input": ["a", "b", "c"]})
        finally:
            await nc.close()
    [event] = ok
    assert event["type"] == "embeddings"
    assert event["embeddings"] == want
    assert event["model"] == MODEL
    assert event["seq"] == 0
    [error] = too_many  # the worker enforces the limits too: not every publisher is the edge
    assert (error["type"], error["code"]) == ("error", "request_too_large")


async def test_a_reply_too_big_for_one_nats_message_arrives_in_parts_and_whole_over_http(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    texts = [f"sentence number {i}" for i in range(24)]  # 24 x 4096 floats: over 1 MB of JSON
    want = await expected(fake_ollama, texts, dimensions=4096)
    async with stack(settings, embed_cache_ttl_s=0) as http:
        over_http = await http.post("/v1/embed", json={"model": MODEL, "input": texts, "dimensions": 4096})
        nc = await nats.connect(settings.nats_url)
        try:
            request = {"id": uuid.uuid4().hex, "model": MODEL, "input": texts, "dimensions": 4096}
            events = await _publish(nc, request)
        finally:
            await nc.close()
    assert over_http.json()["embeddings"] == want
    assert [event["type"] for event in events] == ["vectors"] * (len(events) - 1) + ["embeddings"]
    assert len(events) > 1
    assert events[0].get("index", 0) == 0
    assert events[-1]["index"] == sum(len(event["embeddings"]) for event in events[:-1])
    assert [vector for event in events for vector in event["embeddings"]] == want


async def test_dimensions_cut_and_renormalised_for_matryoshka_models_when_the_backend_ignores_them(
    settings: Settings, fake_ollama: FakeOllama
) -> None:
    [full] = await expected(fake_ollama, ["red kite"])  # (resets the fake's configuration)
    fake_ollama.config.embed_dimensions = False  # an older Ollama: always its full 64 dimensions
    fake_ollama.config.models.append("all-minilm:latest")
    async with stack(settings) as http:
        cut = await http.post("/v1/embed", json={"model": MODEL, "input": "red kite", "dimensions": 16})
        again = await http.post("/v1/embed", json={"model": MODEL, "input": "red kite", "dimensions": 16})
        other = await http.post("/v1/embed", json={"model": MODEL, "input": "red kite", "dimensions": 8})
        whole = await http.post("/v1/embed", json={"model": MODEL, "input": "red kite"})
        cannot = await http.post("/v1/embed", json={"model": "all-minilm", "input": "x", "dimensions": 16})
        above = await http.post("/v1/embed", json={"model": MODEL, "input": "y", "dimensions": 128})
    [vector] = cut.json()["embeddings"]
    norm = sum(x * x for x in full[:16]) ** 0.5
    assert vector == pytest.approx([x / norm for x in full[:16]], abs=1e-6)  # the head, at unit length
    assert sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-5)
    assert again.json()["embeddings"] == [vector] and again.json()["usage"]["cached"] == 1
    assert len(other.json()["embeddings"][0]) == 8 and other.json()["usage"]["cached"] == 0  # its own key
    assert whole.json()["embeddings"] == [full]
    for refused, why in ((cannot, "not Matryoshka-trained"), (above, "fewer than asked")):
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (
            error["code"] == "unsupported" and "`dimensions`" in error["message"] and why in error["message"]
        )


@pytest.mark.parametrize(
    ("model", "cut"),
    [
        ("nomic-embed-text", True),
        ("nomic-embed-text:v1.5", True),
        ("hf.co/nomic-ai/nomic-embed-text-v1.5-GGUF:Q4_K_M", True),
        ("nomic-embed-text-v1.f16", False),  # v1 was not Matryoshka-trained
        ("mxbai-embed-large:335m", True),
        ("embeddinggemma", True),
        ("qwen3-embedding:0.6b", True),
        ("all-minilm", False),
        ("bge-m3", False),
        ("multilingual-e5-small-q4", False),
    ],
)
def test_the_matryoshka_list(model: str, cut: bool) -> None:
    assert matryoshka.is_matryoshka(model) is cut
