"""The end of a request, seen from every path: one terminal event, and a resume at or past it
answers at once (issue 23: a resume at the end waited for the deadline; a deadline gave two)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import msgspec
import nats
import pytest

from contracts import subjects
from services.generator.main import Generator
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import SseEvent, collect

MODEL = "llama3.2:1b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "tell me about rivers"}]}
QUICK = 3.0  # an answer "at once": well under any deadline (the default is 600 s)


def terminals(events: list[SseEvent]) -> list[SseEvent]:
    return [e for e in events if e.event in ("done", "error")]


async def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await call
    return response, time.monotonic() - started


async def test_resuming_a_finished_request_at_or_past_its_end_answers_204_at_once(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/chat", json={**CHAT, "stream": True})
    live = await collect(response)
    end = int(live[-1].id or "")
    url = f"/v1/requests/{response.headers['x-request-id']}/events"
    cases: list[tuple[dict[str, str], dict[str, Any]]] = [
        ({"Last-Event-ID": str(end)}, {}),  # what EventSource sends after the stream closed
        ({}, {"after": end}),
        ({"Last-Event-ID": str(end + 50)}, {}),
        ({"Last-Event-ID": str(10**30)}, {}),
        ({}, {"after": 10**30}),
    ]
    for hdrs, params in cases:
        answer, took = await timed(client.get(url, headers=hdrs, params=params, timeout=QUICK))
        assert answer.status_code == 204 and answer.content == b"", (hdrs, params, answer.text)
        assert took < QUICK
    # Just before the end: the terminal event, once.
    before = await collect(await client.get(url, headers={"Last-Event-ID": str(end - 1)}, timeout=QUICK))
    assert [(e.id, e.data) for e in before] == [(live[-1].id, live[-1].data)]


async def test_an_idempotent_retry_at_the_end_answers_204_and_a_json_retry_the_whole_answer(
    client: httpx.AsyncClient,
) -> None:
    key = f"end-{uuid.uuid4().hex[:12]}"
    first = await collect(
        await client.post("/v1/chat", json={**CHAT, "stream": True}, headers={"Idempotency-Key": key})
    )
    end = first[-1].id or ""
    for last in (end, str(10**30)):
        retry, took = await timed(
            client.post(
                "/v1/chat",
                json={**CHAT, "stream": True},
                headers={"Idempotency-Key": key, "Last-Event-ID": last},
                timeout=QUICK,
            )
        )
        assert retry.status_code == 204 and retry.content == b"" and took < QUICK
    # A JSON answer is always the whole answer: Last-Event-ID does not cut it.
    whole = await client.post(
        "/v1/chat", json=CHAT, headers={"Idempotency-Key": key, "Last-Event-ID": end}, timeout=QUICK
    )
    assert whole.status_code == 200, whole.text
    text = "".join(e.data["text"] for e in first if e.event == "token")
    assert whole.json()["text"] == text


async def test_following_a_running_request_past_its_end_closes_when_it_ends(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 20
    fake_ollama.config.token_interval = 0.02
    request_id = (await client.post("/v1/chat", json={**CHAT, "stream": "deferred"})).json()["request_id"]
    url = f"/v1/requests/{request_id}/events"
    for hdrs in ({"Last-Event-ID": str(10**30)}, {"Last-Event-ID": "999"}):
        answer, took = await timed(client.get(url, headers=hdrs, timeout=QUICK))
        assert answer.status_code in (200, 204) and await collect(answer) == [] and took < QUICK


async def test_a_running_request_stopped_at_its_deadline_has_one_terminal_event_with_an_id(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.02
    response = await client.post("/v1/chat", json={**CHAT, "stream": True, "timeout": 0.5})
    live = await collect(response)
    assert [e.data["code"] for e in terminals(live)] == ["deadline_exceeded"]
    assert live[-1].id is not None and int(live[-1].id) == live[-1].data["seq"]
    url = f"/v1/requests/{response.headers['x-request-id']}/events"
    replay = await collect(await client.get(url, timeout=QUICK))
    assert [(e.id, e.data) for e in replay] == [(e.id, e.data) for e in live]
    resumed = await collect(await client.get(url, headers={"Last-Event-ID": live[-2].id or ""}))
    assert [(e.id, e.data) for e in resumed] == [(live[-1].id, live[-1].data)]
    assert (await client.get(url, headers={"Last-Event-ID": live[-1].id or ""})).status_code == 204


async def test_a_request_no_worker_took_before_its_deadline_has_one_terminal_event_on_every_path(
    edge: Edge, settings: Settings, fake_ollama: FakeOllama
) -> None:
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        response = await http.post("/v1/chat", json={**CHAT, "stream": True, "timeout": 0.5})
        live = await collect(response)  # no generator runs: the edge ends it
        request_id = response.headers["x-request-id"]
        # It waited (its place, `queued`, no id: not part of the sequence), then ended once.
        assert {e.event for e in live[:-1]} <= {"queued"} and all(e.id is None for e in live[:-1])
        live = live[-1:]
        [error] = live
        assert error.event == "error" and error.data["code"] == "deadline_exceeded" and error.id == "0"
        # A generator starts later and finds the expired request: it adds no second ending.
        gen = Generator(settings)
        await gen.start()
        try:
            nc = await nats.connect(settings.nats_url)
            try:
                async with asyncio.timeout(10):
                    while (await nc.jetstream().stream_info(subjects.REQUEST_STREAM)).state.messages:
                        await asyncio.sleep(0.05)
            finally:
                await nc.close()
        finally:
            await gen.stop(grace=0)
        replay = await collect(await http.get(f"/v1/requests/{request_id}/events"))
        assert [(e.id, e.data) for e in replay] == [(error.id, error.data)]
        assert [c for c in fake_ollama.calls if c.path == "/api/chat"] == []


@pytest.mark.parametrize("then", ["follow", "cancel"])
async def test_the_owner_can_follow_or_cancel_on_another_edge_right_after_the_202(
    edge: Edge, settings: Settings, then: str
) -> None:
    # No generator: nothing but the edge's `accepted` record says the request exists.
    other = msgspec.structs.replace(settings, http_port=free_port())
    async with (
        Edge(other) as second,
        httpx.AsyncClient(base_url=edge.url, timeout=10) as first_http,
        httpx.AsyncClient(base_url=second.url, timeout=10) as second_http,
    ):
        for _ in range(100):
            accepted = await first_http.post("/v1/chat", json={**CHAT, "stream": "deferred"})
            request_id = accepted.json()["request_id"]
            if then == "follow":
                async with second_http.stream("GET", f"/v1/requests/{request_id}/events") as answer:
                    status = answer.status_code
            else:
                status = (await second_http.delete(f"/v1/requests/{request_id}")).status_code
            assert status in (200, 202), status


async def test_a_compat_stream_whose_worker_vanished_still_ends_at_its_deadline(
    edge: Edge, settings: Settings, fake_ollama: FakeOllama
) -> None:
    # OpenAI's and Ollama's streams hold their status for the first word, read by the handler's
    # task; the rest is read by the relay's. The edge's own deadline must end the stream anyway
    # when no worker will (it was an `asyncio.timeout` bound to the handler's task: a hang).
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.02
    gen = Generator(settings)
    await gen.start()
    body = {**CHAT, "stream": True, "timeout": 1.5}
    lines: list[str] = []
    started = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=30) as http,
        http.stream("POST", "/openai/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line)
            if len(lines) == 3:
                await gen.stop(grace=0)  # no terminal event from it: nothing else serves it
    took = time.monotonic() - started
    assert lines[-1] == "data: [DONE]"
    error = msgspec.json.decode(lines[-2][len("data: ") :])["error"]
    assert error["code"] == "deadline_exceeded"
    assert took < 1.5 + 2.0 + QUICK  # the deadline and its grace, not the client's 30 s
