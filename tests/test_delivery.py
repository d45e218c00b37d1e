"""Delivery guarantees in one process: take-over after a crash, resume, cancel, idempotency,
deadlines, dead letters and upstream failures, against a real nats-server and the fake Ollama."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client

from contracts import Start, Token, headers, subjects
from services import dlq as dlq_cli
from services.generator.main import Generator
from services.runtime import bus, dlq
from services.runtime.events import Sequencer, published
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests.answers import Audit, full_answer
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import collect, sse_events

MODEL = "llama3.2:1b"
MESSAGES = [{"role": "user", "content": "tell me about rivers"}]
CHAT = {"model": MODEL, "messages": MESSAGES}
_encode = msgspec.json.Encoder().encode


def fast(settings: Settings, **changes: Any) -> Settings:
    """Short ack wait and tiny backoff, so redeliveries and retries take moments."""
    base: dict[str, Any] = {"ack_wait_s": 0.6, "backend_retry_base_s": 0.01, "backend_retry_max_s": 0.05}
    return msgspec.structs.replace(settings, **(base | changes))


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await nats.connect(settings.nats_url)
    await bus.provision(conn.jetstream(), settings)
    yield conn
    await conn.close()


async def running(settings: Settings) -> Generator:
    gen = Generator(settings)
    await gen.start()
    return gen


async def follow(nc: Client, request_id: str) -> asyncio.Queue[dict[str, Any]]:
    """Subscribes to a request's events (before it is published), as a direct NATS client does."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def put(msg: Any) -> None:
        queue.put_nowait(json.loads(msg.data))

    await nc.subscribe(subjects.event_subject(request_id), cb=put)
    return queue


async def until_terminal(queue: asyncio.Queue[dict[str, Any]], timeout: float = 10) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not out or out[-1]["type"] not in ("done", "error"):
            out.append(await queue.get())
    await asyncio.sleep(0.05)  # anything after the terminal event would be a bug: let it show
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def publish(nc: Client, body: dict[str, Any], **hdrs: str) -> str:
    request_id: str = body["id"]
    subject = subjects.generate_subject(body["model"])
    all_headers = {headers.MSG_ID: request_id, headers.REPLY: subjects.event_subject(request_id), **hdrs}
    await nc.jetstream().publish(subject, json.dumps(body).encode(), headers=all_headers)
    return request_id


def chat_calls(fake: FakeOllama) -> list[Any]:
    return [c for c in fake.calls if c.path == "/api/chat"]


async def crashed_first_attempt(
    nc: Client, settings: Settings, body: dict[str, Any], pieces: list[str]
) -> None:
    """Plays a generator that took the request, streamed `pieces` and died without acking."""
    js = nc.jetstream()
    await bus.ensure_consumer(js, settings, "generator", subjects.GENERATE_SUBJECTS)
    pull = await js.pull_subscribe_bind("generator", subjects.REQUEST_STREAM)
    await publish(nc, body)
    [msg] = await pull.fetch(1, timeout=5)
    assert msg.metadata.num_delivered == 1
    reply = subjects.event_subject(body["id"])
    await nc.publish(reply, _encode(Start(seq=0, attempt=1, request_id=body["id"], model=body["model"])))
    for seq, piece in enumerate(pieces, start=1):
        await nc.publish(reply, _encode(Token(seq=seq, attempt=1, text=piece)))
    await nc.flush()
    await pull.unsubscribe()


# -- taking over after a crash -------------------------------------------------------------------


async def test_redelivered_chat_continues_after_the_tokens_already_published(
    settings: Settings, nc: Client, fake_ollama: FakeOllama
) -> None:
    settings = fast(settings)
    fake_ollama.config.tokens = 12
    answer = await full_answer(fake_ollama.url, MODEL, MESSAGES)
    fake_ollama.calls.clear()
    body: dict[str, Any] = {"id": uuid.uuid4().hex, **CHAT}
    events = await follow(nc, body["id"])
    await crashed_first_attempt(nc, settings, body, answer[:5])
    gen = await running(settings)
    try:
        seen = await until_terminal(events)
    finally:
        await gen.stop(grace=0)

    audit = Audit.of(seen, answer)
    assert audit.seamless, audit
    assert [e["type"] for e in seen].count("start") == 1
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    assert {e["attempt"] for e in seen if e["seq"] > 5} == {2}
    # The model was asked to continue: the text so far went upstream as the assistant's prefix.
    [call] = chat_calls(fake_ollama)
    assert call.body["messages"][-1] == {"role": "assistant", "content": "".join(answer[:5])}
    assert seen[-1]["usage"]["completion_tokens"] == len(answer)


async def test_redelivered_prompt_request_restarts_with_a_restart_event(
    settings: Settings, nc: Client, fake_ollama: FakeOllama
) -> None:
    settings = fast(settings)
    body: dict[str, Any] = {"id": uuid.uuid4().hex, "model": MODEL, "prompt": "name three rivers"}
    events = await follow(nc, body["id"])
    await crashed_first_attempt(nc, settings, body, ["lost ", "words "])
    gen = await running(settings)
    try:
        seen = await until_terminal(events)
    finally:
        await gen.stop(grace=0)

    types = [e["type"] for e in seen]
    assert types[:4] == ["start", "token", "token", "restart"]
    assert types[-1] == "done" and types.count("done") == 1
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    after_restart = "".join(e["text"] for e in seen[4:] if e["type"] == "token")
    assert len(after_restart.split()) == fake_ollama.config.tokens  # the whole answer, from the start


async def test_redelivered_request_that_already_ended_is_acked_without_new_events(
    settings: Settings, nc: Client, fake_ollama: FakeOllama
) -> None:
    settings = fast(settings)
    body: dict[str, Any] = {"id": uuid.uuid4().hex, **CHAT}
    events = await follow(nc, body["id"])
    await crashed_first_attempt(nc, settings, body, ["all ", "of ", "it "])
    done = {"type": "done", "seq": 4, "attempt": 1, "finish_reason": "stop"}
    done |= {
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        "timings": {"total_ms": 1},
    }
    await nc.jetstream().publish(subjects.event_subject(body["id"]), json.dumps(done).encode())
    gen = await running(settings)
    try:
        js = nc.jetstream()
        async with asyncio.timeout(10):
            while (await js.stream_info(subjects.REQUEST_STREAM)).state.messages:
                await asyncio.sleep(0.05)  # acked: gone from the work queue
    finally:
        await gen.stop(grace=0)
    seen = [events.get_nowait() for _ in range(events.qsize())]
    assert [e["type"] for e in seen] == ["start", "token", "token", "token", "done"]
    assert chat_calls(fake_ollama) == []


def test_sequencer_orders_drops_repeats_and_skips_a_gap_only_when_told() -> None:
    from contracts import EventHead

    def ev(kind: str, seq: int) -> tuple[EventHead, bytes]:
        return EventHead(type=kind, seq=seq), json.dumps(
            {"type": kind, "seq": seq, "attempt": 1, "text": f"{seq} "}
        ).encode()

    sequencer, out = Sequencer(), list[tuple[EventHead, bytes]]()
    for kind, seq in [("start", 0), ("token", 2), ("token", 1), ("token", 1), ("token", 4)]:
        sequencer.offer(*ev(kind, seq), out)
    assert [h.seq for h, _ in out] == [0, 1, 2] and sequencer.gap
    sequencer.skip_gap(out)
    sequencer.offer(*ev("done", 5), out)
    assert [h.seq for h, _ in out] == [0, 1, 2, 4, 5] and sequencer.ended
    state = published([ev("start", 0), ev("token", 1), ev("token", 3)])
    assert (state.next_seq, state.text, state.ended) == (4, "1 3 ", False)


# -- resume, deferred, cancel --------------------------------------------------------------------


async def test_deferred_request_answers_202_and_resumes_after_last_event_id(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 20
    fake_ollama.config.token_interval = 0.02
    answer = await full_answer(fake_ollama.url, MODEL, MESSAGES)
    fake_ollama.calls.clear()
    accepted = await client.post("/v1/chat", json={**CHAT, "stream": "deferred"})
    assert accepted.status_code == 202
    request_id = accepted.json()["request_id"]
    assert accepted.json()["events_url"] == f"/v1/requests/{request_id}/events"
    assert accepted.headers["location"] == accepted.json()["events_url"]

    first: list[dict[str, Any]] = []
    async with client.stream("GET", accepted.json()["events_url"]) as response:
        assert response.status_code == 200
        async for event in sse_events(response):
            first.append(event.data)
            if len(first) == 6:
                break  # the connection drops
    last_id = first[-1]["seq"]
    async with client.stream(
        "GET", accepted.json()["events_url"], headers={"Last-Event-ID": str(last_id)}
    ) as response:
        rest = [event.data for event in await collect(response)]

    assert rest[0]["seq"] == last_id + 1
    audit = Audit.of(first + rest, answer)
    assert audit.seamless, audit
    [call] = chat_calls(fake_ollama)
    assert not call.disconnected  # hanging up on the events URL never cancels the request


async def test_finished_request_replays_in_full_from_any_edge(
    client: httpx.AsyncClient, fake_ollama: FakeOllama, settings: Settings
) -> None:
    response = await client.post("/v1/chat", json={**CHAT, "stream": True})
    live = [e.data for e in await collect(response)]
    request_id = response.headers["x-request-id"]
    other = msgspec.structs.replace(settings, http_port=free_port())
    async with Edge(other) as second, httpx.AsyncClient(base_url=second.url, timeout=10) as http:
        replay = await http.get(f"/v1/requests/{request_id}/events", params={"after": 2})
    replayed = [e.data for e in await collect(replay)]
    assert replayed == live[3:]


async def test_events_of_an_unknown_request_are_not_found(client: httpx.AsyncClient) -> None:
    response = await client.get(f"/v1/requests/{uuid.uuid4().hex}/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    bad = await client.get("/v1/requests/no!/events")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    garbled = await client.get(f"/v1/requests/{uuid.uuid4().hex}/events", headers={"Last-Event-ID": "x"})
    assert garbled.json()["error"]["code"] == "bad_request"


async def test_delete_cancels_a_running_request_and_closes_the_upstream_call(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.02
    request_id = (await client.post("/v1/chat", json={**CHAT, "stream": "deferred"})).json()["request_id"]
    await fake_ollama.wait_for(lambda: any(c.tokens_sent > 2 for c in fake_ollama.calls))
    cancelled = await client.delete(f"/v1/requests/{request_id}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelling"
    events = [e.data for e in await collect(await client.get(f"/v1/requests/{request_id}/events"))]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "cancelled"
    [call] = await fake_ollama.wait_disconnected(1)
    assert call.tokens_sent < 1000
    again = await client.delete(f"/v1/requests/{request_id}")
    assert again.status_code == 200 and again.json()["status"] == "ended"
    unknown = await client.delete(f"/v1/requests/{uuid.uuid4().hex}")
    assert unknown.status_code == 404


# -- idempotency ---------------------------------------------------------------------------------


async def test_retry_with_the_same_idempotency_key_runs_once_and_gets_the_same_answer(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex[:12]}"}
    first, second = await asyncio.gather(
        client.post("/v1/chat", json=CHAT, headers=key), client.post("/v1/chat", json=CHAT, headers=key)
    )
    third = await client.post("/v1/chat", json=CHAT, headers=key)
    assert first.status_code == second.status_code == third.status_code == 200
    assert first.json() == second.json() == third.json()
    assert first.json()["request_id"] == key["Idempotency-Key"]
    assert len(chat_calls(fake_ollama)) == 1


async def test_idempotent_stream_survives_a_dropped_connection_and_resumes_on_retry(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 15
    fake_ollama.config.token_interval = 0.02
    answer = await full_answer(fake_ollama.url, MODEL, MESSAGES)
    fake_ollama.calls.clear()
    key = f"retry-{uuid.uuid4().hex[:12]}"
    body = {**CHAT, "stream": True}
    first: list[dict[str, Any]] = []
    async with client.stream("POST", "/v1/chat", json=body, headers={"Idempotency-Key": key}) as response:
        async for event in sse_events(response):
            first.append(event.data)
            if len(first) == 4:
                break
    retry_headers = {"Idempotency-Key": key, "Last-Event-ID": str(first[-1]["seq"])}
    async with client.stream("POST", "/v1/chat", json=body, headers=retry_headers) as response:
        rest = [event.data for event in await collect(response)]
    audit = Audit.of(first + rest, answer)
    assert audit.seamless, audit
    [call] = chat_calls(fake_ollama)
    assert not call.disconnected


async def test_idempotency_key_reused_for_another_request_is_refused(client: httpx.AsyncClient) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    assert (await client.post("/v1/chat", json=CHAT, headers=key)).status_code == 200
    other = {**CHAT, "messages": [{"role": "user", "content": "something else"}]}
    response = await client.post("/v1/chat", json=other, headers=key)
    assert response.status_code == 400 and "Idempotency-Key" in response.json()["error"]["message"]
    bad = await client.post("/v1/chat", json=CHAT, headers={"Idempotency-Key": "short"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"


# -- deadlines -----------------------------------------------------------------------------------


async def test_running_request_is_stopped_at_its_deadline(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.02
    response = await client.post("/v1/chat", json={**CHAT, "stream": True, "timeout": 0.5})
    events = [e.data for e in await collect(response)]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "deadline_exceeded"
    assert sum(e["type"] in ("done", "error") for e in events) == 1
    [call] = await fake_ollama.wait_disconnected(1)
    assert call.tokens_sent < 1000


async def test_expired_request_is_never_started(
    generator: Generator, nc: Client, fake_ollama: FakeOllama
) -> None:
    body: dict[str, Any] = {"id": uuid.uuid4().hex, **CHAT}
    events = await follow(nc, body["id"])
    await publish(nc, body, **{headers.DEADLINE: str(int((time.time() - 1) * 1000))})
    [event] = await until_terminal(events)
    assert event["code"] == "deadline_exceeded"
    assert chat_calls(fake_ollama) == []


# -- dead letters --------------------------------------------------------------------------------


async def test_undecodable_request_is_dead_lettered_and_its_sender_told(
    generator: Generator, nc: Client, settings: Settings
) -> None:
    # A direct publisher's inbox: `llm.out.<id>` is valid only for the id the request has, and
    # this one has none (else garbage could end another request's stream with an error).
    reply = f"_INBOX.publisher.{uuid.uuid4().hex}"
    events = await nc.subscribe(reply)
    await nc.jetstream().publish(
        subjects.generate_subject(MODEL), b"{not json", headers={headers.REPLY: reply, "X-Team": "ops"}
    )
    error = json.loads((await events.next_msg(5)).data)
    assert error["type"] == "error" and error["code"] == "bad_request"
    async with asyncio.timeout(5):
        while not (entries := await dlq.entries(nc)):
            await asyncio.sleep(0.05)
    [entry] = entries
    assert entry.reason.startswith("rejected: malformed request")
    assert entry.subject == subjects.generate_subject(MODEL)
    assert entry.data == b"{not json" and entry.headers["X-Team"] == "ops"
    assert (await nc.jetstream().stream_info(subjects.REQUEST_STREAM)).state.messages == 0

    out = io.StringIO()
    assert await dlq_cli._list(nc, 100, out) == 0
    assert "rejected: malformed request" in out.getvalue()


async def test_an_invalid_request_without_a_reply_subject_is_refused_on_its_event_subject(
    generator: Generator, nc: Client
) -> None:
    request_id = uuid.uuid4().hex
    events = await nc.subscribe(subjects.event_subject(request_id))  # the default, as the contract says
    body = _encode({"id": request_id, "model": MODEL, "messages": []})
    await nc.jetstream().publish(subjects.generate_subject(MODEL), body, headers={headers.MSG_ID: request_id})
    error = json.loads((await events.next_msg(5)).data)
    assert error["type"] == "error" and error["code"] == "bad_request" and "empty" in error["message"]


@pytest.mark.parametrize(
    "reply",
    [
        "llm.events.mine",
        "_INBOX.me.>",
        "llm.out.",
        # Another request's subjects, another user's inbox: a publisher may name only its own inbox.
        "llm.out.another-request-0001",
        "llm.out.another-request-0001.accepted",
        "_INBOX.edge.stolen",
    ],
)
async def test_a_reply_subject_workers_cannot_publish_to_is_refused_not_run_unheard(
    generator: Generator, nc: Client, fake_ollama: FakeOllama, reply: str
) -> None:
    request_id = uuid.uuid4().hex
    events = await nc.subscribe(subjects.event_subject(request_id))  # where the refusal goes instead
    body = _encode({"id": request_id, **CHAT})
    await nc.jetstream().publish(
        subjects.generate_subject(MODEL), body, headers={headers.MSG_ID: request_id, headers.REPLY: reply}
    )
    error = json.loads((await events.next_msg(5)).data)
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert (
        "Llmbus-Reply must be the request's own llm.out.<id> or an inbox under _INBOX.publisher."
        in (error["message"])
    )
    async with asyncio.timeout(5):
        while not (entries := await dlq.entries(nc)):
            await asyncio.sleep(0.05)
    assert [entry.headers[headers.REPLY] for entry in entries] == [reply]
    assert chat_calls(fake_ollama) == []  # never run


async def test_request_that_exhausts_max_deliveries_ends_with_error_and_is_dead_lettered(
    settings: Settings, nc: Client, fake_ollama: FakeOllama
) -> None:
    settings = fast(settings, max_deliver=2, ack_wait_s=0.5)
    body: dict[str, Any] = {"id": uuid.uuid4().hex, **CHAT}
    events = await follow(nc, body["id"])
    js = nc.jetstream()
    await bus.ensure_consumer(js, settings, "generator", subjects.GENERATE_SUBJECTS)
    pull = await js.pull_subscribe_bind("generator", subjects.REQUEST_STREAM)
    await publish(nc, body)
    for delivery in (1, 2):  # two workers take it and die without a word
        [msg] = await pull.fetch(1, timeout=5)
        assert msg.metadata.num_delivered == delivery
    await pull.unsubscribe()
    gen = await running(settings)  # listens for JetStream's max-deliveries advisory
    try:
        [error] = await until_terminal(events)
        async with asyncio.timeout(5):
            while not (entries := await dlq.entries(nc)):
                await asyncio.sleep(0.05)
    finally:
        await gen.stop(grace=0)
    assert error["code"] == "internal" and "2 deliveries" in error["message"]
    [entry] = entries
    assert entry.request_id == body["id"] and entry.deliveries == 2
    assert (await js.stream_info(subjects.REQUEST_STREAM)).state.messages == 0
    assert chat_calls(fake_ollama) == []

    # Replayed, it runs again under a new id, and the dead letter is gone.
    replayed = await dlq.replay(nc, entry)
    assert replayed is not None and replayed != body["id"]
    gen = await running(settings)
    try:
        new_events = await follow(nc, replayed)
        assert (await until_terminal(new_events))[-1]["type"] == "done"
    finally:
        await gen.stop(grace=0)
    assert await dlq.entries(nc) == []


def test_dlq_replay_needs_seqs_or_all(settings: Settings) -> None:
    args = argparse.Namespace(dlq_command="replay", seqs=[], all=False, keep=False)
    assert dlq_cli.main(args, settings) == 2


# -- upstream failures ---------------------------------------------------------------------------

RETRIED_THEN_OK = [
    pytest.param({"fail_status": 500, "fail_times": 2}, 3, id="5xx-twice"),
    pytest.param({"fail_status": 503, "fail_times": 1}, 2, id="503-busy"),
    pytest.param({"disconnect_after": 0, "disconnect_times": 1}, 2, id="dropped-before-first-token"),
]


async def with_upstream_fault(
    settings: Settings, nc: Client, fake: FakeOllama, fault: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every event of one chat request while the fake Ollama misbehaves as `fault` says."""
    for key, value in fault.items():
        setattr(fake.config, key, value)
    gen = await running(fast(settings))
    try:
        body: dict[str, Any] = {"id": uuid.uuid4().hex, **CHAT}
        events = await follow(nc, body["id"])
        await publish(nc, body)
        return await until_terminal(events)
    finally:
        await gen.stop(grace=0)


@pytest.mark.parametrize(("fault", "calls"), RETRIED_THEN_OK)
async def test_upstream_failure_before_the_first_token_is_retried(
    settings: Settings, nc: Client, fake_ollama: FakeOllama, fault: dict[str, Any], calls: int
) -> None:
    seen = await with_upstream_fault(settings, nc, fake_ollama, fault)
    assert seen[-1]["type"] == "done", seen[-1]
    assert Audit.of(seen, await full_answer(fake_ollama.url, MODEL, MESSAGES)).seamless
    assert len(chat_calls(fake_ollama)) == calls + 1  # + full_answer


async def test_no_first_token_within_the_timeout_is_retried(
    settings: Settings, nc: Client, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.first_token_delay = 30
    gen = await running(fast(settings, backend_first_token_timeout_s=0.3))
    try:
        body: dict[str, Any] = {"id": uuid.uuid4().hex, **CHAT}
        events = await follow(nc, body["id"])
        await publish(nc, body)
        await fake_ollama.wait_disconnected(1)  # the silent call was given up and closed
        fake_ollama.config.first_token_delay = 0
        seen = await until_terminal(events)
    finally:
        await gen.stop(grace=0)
    assert seen[-1]["type"] == "done"
    stalled = chat_calls(fake_ollama)[0]
    assert stalled.disconnected and stalled.tokens_sent == 0  # the silent call was closed


FAILS = [
    pytest.param({"fail_status": 500}, "backend_error", 4, id="5xx-every-time"),
    pytest.param({"fail_status": 404}, "model_not_found", 1, id="404-not-retried"),
    pytest.param({"fail_status": 400}, "bad_request", 1, id="400-not-retried"),
    pytest.param({"disconnect_after": 3}, "backend_error", 1, id="dropped-after-first-token"),
    pytest.param({"error_after": 3}, "backend_error", 1, id="in-band-error-after-first-token"),
]


@pytest.mark.parametrize(("fault", "code", "calls"), FAILS)
async def test_upstream_failure_ends_the_request_with_one_error(
    settings: Settings, nc: Client, fake_ollama: FakeOllama, fault: dict[str, Any], code: str, calls: int
) -> None:
    seen = await with_upstream_fault(settings, nc, fake_ollama, fault)
    assert seen[-1]["type"] == "error" and seen[-1]["code"] == code
    assert sum(e["type"] in ("done", "error") for e in seen) == 1
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    assert len(chat_calls(fake_ollama)) == calls


async def test_unreachable_model_server_fails_within_the_retry_budget(settings: Settings, nc: Client) -> None:
    gen = await running(fast(settings, ollama_url=f"http://127.0.0.1:{free_port()}"))
    try:
        body: dict[str, Any] = {"id": uuid.uuid4().hex, **CHAT}
        events = await follow(nc, body["id"])
        await publish(nc, body)
        seen = await until_terminal(events, timeout=5)
    finally:
        await gen.stop(grace=0)
    assert seen[-1]["code"] == "backend_unavailable"


async def test_a_json_503_backend_unavailable_says_when_to_retry_on_every_api(settings: Settings) -> None:
    settings = fast(settings, ollama_url=f"http://127.0.0.1:{free_port()}", edge_model_check=False)
    gen = await running(settings)
    try:
        async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
            for path, body in [
                ("/v1/chat", CHAT),
                ("/openai/v1/chat/completions", CHAT),
                ("/ollama/api/chat", {**CHAT, "stream": False}),
            ]:
                response = await http.post(path, json=body)
                assert response.status_code == 503, (path, response.text)
                assert int(response.headers["retry-after"]) >= 1, path
    finally:
        await gen.stop(grace=0)
