"""The generate path end to end: HTTP edge -> real NATS -> generator -> fake Ollama -> SSE."""

from __future__ import annotations

import asyncio
import gc

import httpx

from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import collect, sse_events

CHAT = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}


async def test_streaming_chat_yields_start_tokens_and_one_done(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/v1/chat", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["x-request-id"]
        events = await collect(response)

    kinds = [e.event for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("done") == 1 and "error" not in kinds
    assert events[0].data["request_id"] == request_id
    assert events[0].data["model"] == "llama3.2:1b"
    tokens = [e for e in events if e.event == "token"]
    assert len(tokens) == 8
    assert [e.id for e in events] == [str(i) for i in range(len(events))]
    assert [t.data["seq"] for t in tokens] == list(range(1, 9))
    assert all(t.data["attempt"] == 1 and t.data["text"] for t in tokens)
    done = events[-1].data
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 8
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + 8
    assert done["timings"]["ttft_ms"] <= done["timings"]["total_ms"]


async def test_a_finished_stream_is_freed_without_the_cyclic_collector(
    client: httpx.AsyncClient, edge: Edge
) -> None:
    # A request's objects must not form reference cycles: under load each cycle waits for a full
    # collection, whose pauses (70-110 ms) were the p99 of every stream's token gaps.
    dispatcher = edge.server.config.app.state.dispatcher
    gc.collect()
    gc.disable()
    try:
        for path in ("/v1/chat", "/openai/v1/chat/completions", "/ollama/api/chat"):
            for stream in (True, False):
                async with client.stream("POST", path, json={**CHAT, "stream": stream}) as response:
                    await response.aread()
                assert response.status_code == 200, path
                for _ in range(50):  # `close` unsubscribes in a background task
                    if not dispatcher._feeds:  # a WeakSet: empty once refcounting freed the feed
                        break
                    await asyncio.sleep(0.01)
                assert not dispatcher._feeds, f"{path}: a finished request's feed is kept by a cycle"
    finally:
        gc.enable()


async def test_accept_header_selects_sse(client: httpx.AsyncClient) -> None:
    body = {"model": "llama3.2:1b", "prompt": "hello"}
    async with client.stream("POST", "/v1/generate", json=body, headers={"accept": "text/event-stream"}) as r:
        events = await collect(r)
    assert events[-1].event == "done"


async def test_non_streaming_generate_returns_the_whole_text(client: httpx.AsyncClient) -> None:
    body = {
        "model": "llama3.2:1b",
        "prompt": "Tell me a story",
        "system": "Be brief",
        "options": {"num_predict": 5},
    }
    response = await client.post("/v1/generate", json=body)
    assert response.status_code == 200
    result = response.json()
    assert result["request_id"] == response.headers["x-request-id"]
    assert result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 5
    assert len(result["text"].split()) == 5

    async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as streamed:
        tokens = [e.data["text"] async for e in sse_events(streamed) if e.event == "token"]
    assert "".join(tokens) == result["text"]  # the fake is deterministic


async def test_structured_output_format_reaches_the_backend(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    response = await client.post("/v1/chat", json={**CHAT, "format": schema})
    assert response.status_code == 200
    assert fake_ollama.calls[-1].body["format"] == schema


async def test_unknown_model_is_model_not_found(client: httpx.AsyncClient) -> None:
    body = {**CHAT, "model": "no-such-model:7b"}
    response = await client.post("/v1/chat", json=body)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    async with client.stream("POST", "/v1/chat", json={**body, "stream": True}) as r:
        events = await collect(r)
    assert [e.event for e in events] == ["start", "error"]
    assert events[-1].data["code"] == "model_not_found"


async def test_deadline_stops_a_long_generation(client: httpx.AsyncClient, fake_ollama: FakeOllama) -> None:
    fake_ollama.config.token_interval = 0.2
    response = await client.post("/v1/chat", json={**CHAT, "timeout": 0.5})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    await fake_ollama.wait_disconnected(1, timeout=5)


async def test_backend_error_is_reported_not_hung(client: httpx.AsyncClient, fake_ollama: FakeOllama) -> None:
    fake_ollama.config.fail_status = 500
    fake_ollama.config.fail_message = "out of memory"
    response = await client.post("/v1/chat", json=CHAT)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "backend_error" and "out of memory" in error["message"]


async def test_mid_stream_upstream_disconnect_ends_with_backend_error(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.disconnect_after = 3
    async with client.stream("POST", "/v1/chat", json={**CHAT, "stream": True}) as r:
        events = await collect(r)
    assert [e.event for e in events].count("token") == 3
    assert events[-1].event == "error" and events[-1].data["code"] == "backend_error"


async def test_concurrent_streams_each_get_their_own_answer(client: httpx.AsyncClient) -> None:
    async def one(i: int) -> list[str]:
        body = {"model": "llama3.2:1b", "prompt": f"prompt number {i}", "stream": True}
        async with client.stream("POST", "/v1/generate", json=body) as r:
            return [e.event for e in await collect(r)]

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert all(kinds[0] == "start" and kinds[-1] == "done" and len(kinds) == 10 for kinds in results)
