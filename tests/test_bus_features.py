"""Tools, thinking, images, logprobs, suffix/raw over the bus: a `GenerateRequest` published on NATS
directly, the generator, the Ollama backend and the fake Ollama, which records what reached it."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from contracts import Event, Start, Thinking, ToolCall, ToolCallEvent, ToolCallFunction, subjects
from services.generator.main import Generator
from services.runtime import bus
from services.runtime.settings import Settings
from tests.fakes.ollama import FakeOllama
from tests.test_delivery import fast, follow, publish, running, until_terminal

MODEL = "llama3.2:1b"
VISION = "llava:7b"
THINKER = "qwen3:0.6b"
CODER = "qwen2.5-coder:1.5b"
IMAGE = base64.b64encode(b"\x89PNG\r\n\x1a\n fake pixels").decode()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
_decode = msgspec.json.Decoder(Event).decode
_encode = msgspec.json.Encoder().encode


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await nats.connect(settings.nats_url)
    await bus.provision(conn.jetstream(), settings)
    yield conn
    await conn.close()


@pytest.fixture
def fake(fake_ollama: FakeOllama) -> FakeOllama:
    fake_ollama.config.models += [VISION, THINKER]
    return fake_ollama


async def ask(nc: Client, **body: Any) -> list[dict[str, Any]]:
    body = {"id": uuid.uuid4().hex, "model": MODEL, **body}
    events = await follow(nc, body["id"])
    await publish(nc, body)
    seen = await until_terminal(events)
    for event in seen:
        _decode(json.dumps(event).encode())  # every event is a typed contract event
    return seen


def received(fake: FakeOllama, path: str) -> dict[str, Any]:
    [call] = [c for c in fake.calls if c.path == path]
    body: dict[str, Any] = call.body
    return body


def of(seen: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in seen if e["type"] == kind]


@pytest.mark.usefixtures("generator")
async def test_tools_reach_ollama_and_each_call_comes_back_once_typed(nc: Client, fake: FakeOllama) -> None:
    fake.config.tool_calls = 2
    user = {"role": "user", "content": "weather in Paris, and the time?"}
    seen = await ask(nc, messages=[user], tools=[WEATHER, TIME])

    sent = received(fake, "/api/chat")
    assert sent["tools"] == [WEATHER, TIME]
    calls = of(seen, "tool_call")
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["call"]["function"] for c in calls] == [
        {"name": "get_weather", "arguments": {"city": "x"}},
        {"name": "get_time", "arguments": {}},
    ]
    assert all(c["call"]["id"].startswith("call_") for c in calls)
    assert not of(seen, "token")
    assert seen[-1]["type"] == "done" and seen[-1]["finish_reason"] == "tool_calls"


@pytest.mark.usefixtures("generator")
async def test_the_tool_round_trip_reaches_ollama_in_its_shape(nc: Client, fake: FakeOllama) -> None:
    call = {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call], "thinking": "they want weather"},
        {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"},
    ]
    seen = await ask(nc, messages=messages, tools=[WEATHER])

    sent = received(fake, "/api/chat")["messages"]
    assert sent[1]["tool_calls"] == [
        {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert sent[1]["thinking"] == "they want weather"
    # OpenAI clients link a result by id only; Ollama's templates want the tool's name.
    assert sent[2] == {
        "role": "tool",
        "content": "sunny, 21 C",
        "tool_call_id": "call_1",
        "tool_name": "get_weather",
    }
    assert of(seen, "token") and not of(seen, "tool_call")  # after a tool result: an answer
    assert seen[-1]["finish_reason"] == "stop"


@pytest.mark.usefixtures("generator")
async def test_thinking_streams_as_its_own_events_never_in_the_text(nc: Client, fake: FakeOllama) -> None:
    seen = await ask(nc, model=THINKER, messages=[{"role": "user", "content": "2+2?"}], think="high")

    assert received(fake, "/api/chat")["think"] == "high"
    thinking = of(seen, "thinking")
    assert len(thinking) == fake.config.thinking_tokens
    tokens = of(seen, "token")
    assert len(tokens) == fake.config.tokens
    assert seen.index(thinking[-1]) < seen.index(tokens[0])
    assert not {t["text"] for t in thinking} & {t["text"] for t in tokens}  # different vocabulary seeds
    assert seen[-1]["type"] == "done"


@pytest.mark.usefixtures("generator")
async def test_thinking_on_generate_too(nc: Client, fake: FakeOllama) -> None:
    seen = await ask(nc, model=THINKER, prompt="2+2?", think=True)

    assert received(fake, "/api/generate")["think"] is True
    assert len(of(seen, "thinking")) == fake.config.thinking_tokens
    assert len(of(seen, "token")) == fake.config.tokens


@pytest.mark.usefixtures("generator")
async def test_logprobs_come_on_the_token_events(nc: Client, fake: FakeOllama) -> None:
    seen = await ask(nc, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=3)

    sent = received(fake, "/api/chat")
    assert sent["logprobs"] is True and sent["top_logprobs"] == 3
    tokens = of(seen, "token")
    assert len(tokens) == fake.config.tokens
    for token in tokens:
        [lp] = token["logprobs"]
        assert lp["token"] == token["text"] and lp["logprob"] <= 0
        assert lp["bytes"] == list(token["text"].encode())
        assert len(lp["top_logprobs"]) == 3 and lp["top_logprobs"][0]["token"] == token["text"]


@pytest.mark.usefixtures("generator")
async def test_images_suffix_and_raw_reach_ollama_in_place(nc: Client, fake: FakeOllama) -> None:
    await ask(nc, model=VISION, messages=[{"role": "user", "content": "what is this?", "images": [IMAGE]}])
    await ask(nc, model=VISION, prompt="describe", images=[IMAGE], raw=True)
    await ask(nc, model=CODER, prompt="def add(a, b):", suffix="    return c")

    assert received(fake, "/api/chat")["messages"][0]["images"] == [IMAGE]
    generated = [c.body for c in fake.calls if c.path == "/api/generate"]
    assert generated[0]["images"] == [IMAGE] and generated[0]["raw"] is True
    assert generated[1]["suffix"] == "    return c"


@pytest.mark.usefixtures("generator")
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [{"role": "user", "content": "see", "images": [IMAGE]}]}, "`images`"),
        ({"prompt": "see", "images": [IMAGE]}, "`images`"),
        (
            {"model": "gemma3:1b", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]},
            "`tools`",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "think": True}, "`think`"),
        ({"prompt": "def f():", "suffix": "pass"}, "`suffix`"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "tool_choice": "required"},
            "`tool_choice`",
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [WEATHER],
                "parallel_tool_calls": False,
            },
            "`parallel_tool_calls`",
        ),
    ],
)
async def test_what_the_model_or_ollama_cannot_do_is_unsupported(
    nc: Client, fake: FakeOllama, body: dict[str, Any], field: str
) -> None:
    fake.config.models.append("gemma3:1b")
    start, event = await ask(nc, **body)
    assert start["type"] == "start"
    assert event["type"] == "error" and event["code"] == "unsupported", event
    assert field in event["message"]


@pytest.mark.usefixtures("generator")
async def test_tool_choice_none_sends_no_tools(nc: Client, fake: FakeOllama) -> None:
    seen = await ask(nc, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="none")
    assert "tools" not in received(fake, "/api/chat")
    assert of(seen, "token") and not of(seen, "tool_call")


async def test_invalid_tool_fields_are_bad_requests(nc: Client, generator: Generator) -> None:
    user = {"role": "user", "content": "hi"}
    for body in (
        {"messages": [user], "tool_choice": {"name": "nope"}, "tools": [WEATHER]},
        {"prompt": "hi", "tools": [WEATHER]},
        {"messages": [user], "images": [IMAGE]},
        {"messages": [{**user, "tool_call_id": "x"}]},
        {"messages": [user], "top_logprobs": 2},
        {"messages": [user], "think": "max"},
    ):
        [event] = await ask(nc, **body)
        assert event["type"] == "error" and event["code"] == "bad_request", (body, event)


# -- a crash in the middle of the calls ------------------------------------------------------------


async def crashed_after(nc: Client, settings: Settings, body: dict[str, Any], events: list[Any]) -> None:
    """Plays a generator that took the request, published `events` after `start` and died."""
    js = nc.jetstream()
    await bus.ensure_consumer(js, settings, "generator", subjects.GENERATE_SUBJECTS)
    pull = await js.pull_subscribe_bind("generator", subjects.REQUEST_STREAM)
    await publish(nc, body)
    [msg] = await pull.fetch(1, timeout=5)
    reply = subjects.event_subject(body["id"])
    await nc.publish(reply, _encode(Start(seq=0, attempt=1, request_id=body["id"], model=body["model"])))
    for seq, event in enumerate(events, start=1):
        await nc.publish(reply, _encode(msgspec.structs.replace(event, seq=seq)))
    await nc.flush()
    await pull.unsubscribe()
    assert msg.metadata.num_delivered == 1


async def test_a_worker_crash_between_tool_calls_delivers_each_call_once_and_whole(
    settings: Settings, nc: Client, fake: FakeOllama
) -> None:
    settings = fast(settings)
    fake.config.tool_calls = 3
    body: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "model": MODEL,
        "messages": [{"role": "user", "content": "weather and time"}],
        "tools": [WEATHER, TIME],
    }
    # What the first attempt delivered: the model's first call, as the fake makes it every time.
    first = ToolCall(id="call_first", function=ToolCallFunction("get_weather", {"city": "x"}))
    events = await follow(nc, body["id"])
    await crashed_after(nc, settings, body, [ToolCallEvent(seq=0, attempt=1, index=0, call=first)])
    gen = await running(settings)
    try:
        seen = await until_terminal(events)
    finally:
        await gen.stop(grace=0)

    calls = of(seen, "tool_call")
    assert [c["index"] for c in calls] == [0, 1, 2]
    assert calls[0]["call"]["id"] == "call_first"  # the delivered call stands; it is not sent again
    assert [c["call"]["function"]["name"] for c in calls] == ["get_weather", "get_time", "get_weather"]
    assert {c["attempt"] for c in calls[1:]} == {2}
    assert len({c["call"]["id"] for c in calls}) == 3
    assert [e["seq"] for e in seen] == list(range(len(seen)))
    assert seen[-1]["type"] == "done" and seen[-1]["finish_reason"] == "tool_calls"


async def test_a_new_attempt_that_calls_differently_sends_none_of_its_calls(
    settings: Settings, nc: Client, fake: FakeOllama
) -> None:
    settings = fast(settings)
    fake.config.tool_calls = 2
    body: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "model": MODEL,
        "messages": [{"role": "user", "content": "time please"}],
        "tools": [WEATHER, TIME],
    }
    other = ToolCall(id="call_other", function=ToolCallFunction("get_time", {}))
    events = await follow(nc, body["id"])
    await crashed_after(nc, settings, body, [ToolCallEvent(seq=0, attempt=1, index=0, call=other)])
    gen = await running(settings)
    try:
        seen = await until_terminal(events)
    finally:
        await gen.stop(grace=0)

    assert [c["call"]["id"] for c in of(seen, "tool_call")] == ["call_other"]
    assert seen[-1]["type"] == "done" and seen[-1]["finish_reason"] == "tool_calls"


async def test_a_crash_mid_thinking_does_not_repeat_the_thinking(
    settings: Settings, nc: Client, fake: FakeOllama
) -> None:
    settings = fast(settings)
    body: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "model": THINKER,
        "messages": [{"role": "user", "content": "think first"}],
        "think": True,
    }
    # The fake's thinking and answer for this conversation, from a run under another id.
    gen = await running(settings)
    try:
        reference = await ask(nc, **{k: v for k, v in body.items() if k != "id"})
    finally:
        await gen.stop(grace=0)
    thoughts = [e["text"] for e in of(reference, "thinking")]
    events = await follow(nc, body["id"])
    delivered = [Thinking(seq=0, attempt=1, text=t) for t in thoughts[:2]]
    await crashed_after(nc, settings, body, delivered)
    gen = await running(settings)
    try:
        seen = await until_terminal(events)
    finally:
        await gen.stop(grace=0)

    assert "".join(e["text"] for e in of(seen, "thinking")) == "".join(thoughts)
    assert "".join(e["text"] for e in of(seen, "token")) == "".join(e["text"] for e in of(reference, "token"))
