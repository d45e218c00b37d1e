"""The field table of docs/contract.md, walked: every field of every API's request body is carried
to the backend (it reaches the fake Ollama in place), answered by the edge itself, or refused with
400 `unsupported` naming it. The fields come from the body Structs, so a field added to a body
fails `test_every_field_is_in_the_table` until someone decides what llmbus does with it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest

import contracts
from services.edge import bodies
from services.edge.compat import ollama_bodies, openai_bodies
from services.edge.embed import EmbedBody
from services.embedder.main import Embedder
from services.generator.main import Generator
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.test_bus_features import CODER, IMAGE, THINKER, VISION, WEATHER

MODEL = "llama3.2:1b"
EMBED = "nomic-embed-text:latest"
ASK = [{"role": "user", "content": "hi"}]
TOOLS = {"tools": [WEATHER]}
LOGPROBS = {"logprobs": True}
Upstream = Callable[[dict[str, Any]], bool]


@dataclass
class Carried:
    """Sent with `value` (and `extra`), the field reaches the backend: `check` of its body holds."""

    value: Any
    check: Upstream
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Edge_:
    """Answered by the edge itself (how to answer, or the request's own keys): a 200."""

    value: Any
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Refused:
    value: Any


def at(*path: str | int, equals: Any) -> Upstream:
    def check(body: Any) -> bool:
        for key in path:
            body = body[key]
        return bool(body == equals)

    return check


def has(*path: str | int) -> Upstream:
    def check(body: Any) -> bool:
        for key in path:
            body = body[key]
        return True

    return check


Row = Carried | Edge_ | Refused

_SAMPLING: dict[str, Row] = {
    "model": Edge_(MODEL),
    "stream": Edge_(False),
    "timeout": Edge_(30),
    "max_tokens": Carried(3, at("options", "num_predict", equals=3)),
    "temperature": Carried(0.5, at("options", "temperature", equals=0.5)),
    "top_p": Carried(0.9, at("options", "top_p", equals=0.9)),
    "stop": Carried(["zz"], at("options", "stop", equals=["zz"])),
    "seed": Carried(7, at("options", "seed", equals=7)),
    "presence_penalty": Carried(0.1, at("options", "presence_penalty", equals=0.1)),
    "frequency_penalty": Carried(0.1, at("options", "frequency_penalty", equals=0.1)),
    "stream_options": Edge_({"include_usage": True}, {"stream": True}),
    "n": Refused(2),
    "logit_bias": Refused({"1": 1.0}),
    "user": Refused("someone"),
}

OPENAI_CHAT: dict[str, Row] = _SAMPLING | {
    "messages": Carried(ASK, at("messages", 0, "content", equals="hi")),
    "max_completion_tokens": Carried(3, at("options", "num_predict", equals=3)),
    "response_format": Carried({"type": "json_object"}, at("format", equals="json")),
    "tools": Carried([WEATHER], at("tools", 0, "function", "name", equals="get_weather")),
    "tool_choice": Carried("none", lambda body: "tools" not in body, extra=TOOLS),  # none: no tools shown
    "parallel_tool_calls": Carried(True, has("tools"), extra=TOOLS),
    "reasoning_effort": Carried("high", at("think", equals="high"), model=THINKER),
    "logprobs": Carried(True, at("logprobs", equals=True)),
    "top_logprobs": Carried(2, at("top_logprobs", equals=2), extra=LOGPROBS),
    "audio": Refused({"voice": "alloy", "format": "wav"}),
    "modalities": Refused(["text", "audio"]),
    "function_call": Refused("auto"),
    "functions": Refused([WEATHER["function"]]),
    "metadata": Refused({"a": "b"}),
    "prediction": Refused({"type": "content", "content": "x"}),
    "prompt_cache_key": Refused("k"),
    "prompt_cache_options": Refused({}),
    "prompt_cache_retention": Refused("24h"),
    "moderation": Refused({}),
    "safety_identifier": Refused("s"),
    "service_tier": Refused("flex"),
    "store": Refused(True),
    "verbosity": Refused("low"),
    "web_search_options": Refused({}),
}

OPENAI_COMPLETIONS: dict[str, Row] = _SAMPLING | {
    "prompt": Carried("hi", at("prompt", equals="hi")),
    "suffix": Carried("end", at("suffix", equals="end"), model=CODER),
    "echo": Edge_(True),  # the edge puts the prompt before the text
    "logprobs": Carried(1, at("top_logprobs", equals=1)),
    "best_of": Refused(2),
}

OPENAI_EMBEDDINGS: dict[str, Row] = {
    "model": Edge_(EMBED),
    "input": Carried("openai", lambda body: "openai" in body["input"]),
    "encoding_format": Edge_("base64"),
    "dimensions": Carried(16, at("dimensions", equals=16)),
    "user": Refused("someone"),
    "timeout": Edge_(30),
}

_OLLAMA: dict[str, Row] = {
    "model": Edge_(MODEL),
    "stream": Edge_(False),
    "format": Carried("json", at("format", equals="json")),
    "options": Carried({"temperature": 0.5}, at("options", "temperature", equals=0.5)),
    "think": Carried(True, at("think", equals=True), model=THINKER),
    "logprobs": Carried(True, at("logprobs", equals=True)),
    "top_logprobs": Carried(1, at("top_logprobs", equals=1), extra=LOGPROBS),
    "keep_alive": Refused("5m"),
    "truncate": Refused(False),
    "shift": Refused(False),
}

OLLAMA_CHAT: dict[str, Row] = _OLLAMA | {
    "messages": Carried(ASK, at("messages", 0, "content", equals="hi")),
    "tools": Carried([WEATHER], at("tools", 0, "function", "name", equals="get_weather")),
}

OLLAMA_GENERATE: dict[str, Row] = _OLLAMA | {
    "prompt": Carried("hi", at("prompt", equals="hi")),
    "system": Carried("be brief", at("system", equals="be brief")),
    "suffix": Carried("end", at("suffix", equals="end"), model=CODER),
    "images": Carried([IMAGE], at("images", equals=[IMAGE]), model=VISION),
    "raw": Carried(True, at("raw", equals=True)),
    "template": Refused("{{ .Prompt }}"),
    "context": Refused([1, 2, 3]),
    "width": Refused(64),
    "height": Refused(64),
    "steps": Refused(4),
}

_OLLAMA_EMBED: dict[str, Row] = {
    "model": Edge_(EMBED),
    "options": Refused({"num_ctx": 512}),
    "keep_alive": Refused("5m"),
}

OLLAMA_EMBED: dict[str, Row] = _OLLAMA_EMBED | {
    "input": Carried("ollama", lambda body: "ollama" in body["input"]),
    "truncate": Carried(False, at("truncate", equals=False)),
    "dimensions": Carried(16, at("dimensions", equals=16)),
}

OLLAMA_EMBEDDINGS: dict[str, Row] = _OLLAMA_EMBED | {
    "prompt": Carried("legacy", lambda body: "legacy" in body["input"]),
}

_NATIVE: dict[str, Row] = {
    "model": Edge_(MODEL),
    "stream": Edge_(False),
    "timeout": Edge_(30),
    "cache": Edge_("off"),  # the edge's response cache (docs/cache.md)
    "options": Carried({"temperature": 0.5}, at("options", "temperature", equals=0.5)),
    "format": Carried("json", at("format", equals="json")),
    "think": Carried("low", at("think", equals="low"), model=THINKER),
    "logprobs": Carried(True, at("logprobs", equals=True)),
    "top_logprobs": Carried(1, at("top_logprobs", equals=1), extra=LOGPROBS),
}

NATIVE_CHAT: dict[str, Row] = _NATIVE | {
    "messages": Carried(ASK, at("messages", 0, "content", equals="hi")),
    "tools": Carried([WEATHER], at("tools", 0, "function", "name", equals="get_weather")),
    "tool_choice": Carried("none", lambda body: "tools" not in body, extra=TOOLS),
    "parallel_tool_calls": Carried(True, has("tools"), extra=TOOLS),
}

NATIVE_GENERATE: dict[str, Row] = _NATIVE | {
    "prompt": Carried("hi", at("prompt", equals="hi")),
    "system": Carried("be brief", at("system", equals="be brief")),
    "images": Carried([IMAGE], at("images", equals=[IMAGE]), model=VISION),
    "suffix": Carried("end", at("suffix", equals="end"), model=CODER),
    "raw": Carried(True, at("raw", equals=True)),
}

NATIVE_EMBED: dict[str, Row] = {
    "model": Edge_(EMBED),
    "input": Carried("native", lambda body: "native" in body["input"]),
    "truncate": Carried(False, at("truncate", equals=False)),
    "dimensions": Carried(16, at("dimensions", equals=16)),
    "timeout": Edge_(30),
}

# route, its body Struct, the minimal body, the upstream path, the table
ROUTES: list[tuple[str, type[msgspec.Struct], dict[str, Any], str, dict[str, Row]]] = [
    (
        "/openai/v1/chat/completions",
        openai_bodies.ChatCompletionBody,
        {"messages": ASK},
        "/api/chat",
        OPENAI_CHAT,
    ),
    (
        "/openai/v1/completions",
        openai_bodies.CompletionBody,
        {"prompt": "hi"},
        "/api/generate",
        OPENAI_COMPLETIONS,
    ),
    ("/openai/v1/embeddings", openai_bodies.EmbeddingsBody, {"input": "hi"}, "/api/embed", OPENAI_EMBEDDINGS),
    (
        "/ollama/api/chat",
        ollama_bodies.ChatBody,
        {"messages": ASK, "stream": False},
        "/api/chat",
        OLLAMA_CHAT,
    ),
    (
        "/ollama/api/generate",
        ollama_bodies.GenerateBody,
        {"prompt": "hi", "stream": False},
        "/api/generate",
        OLLAMA_GENERATE,
    ),
    ("/ollama/api/embed", ollama_bodies.EmbedBody, {"input": "hi"}, "/api/embed", OLLAMA_EMBED),
    (
        "/ollama/api/embeddings",
        ollama_bodies.LegacyEmbeddingsBody,
        {"prompt": "hi"},
        "/api/embed",
        OLLAMA_EMBEDDINGS,
    ),
    ("/v1/chat", bodies.ChatBody, {"messages": ASK}, "/api/chat", NATIVE_CHAT),
    ("/v1/generate", bodies.GenerateBody, {"prompt": "hi"}, "/api/generate", NATIVE_GENERATE),
    ("/v1/embed", EmbedBody, {"input": "hi"}, "/api/embed", NATIVE_EMBED),
]


def test_every_field_is_in_the_table() -> None:
    for route, body, _, _, table in ROUTES:
        assert set(body.__struct_fields__) == set(table), f"{route}: decide for each field (docs/contract.md)"


@pytest.fixture
async def stack(
    edge: Edge, generator: Generator, settings: Settings, fake_ollama: FakeOllama
) -> AsyncIterator[httpx.AsyncClient]:
    fake_ollama.config.models += [VISION, THINKER]
    embedder = Embedder(settings)
    await embedder.start()
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        yield http
    await embedder.stop(grace=0)


async def test_each_field_is_carried_or_refused(stack: httpx.AsyncClient, fake_ollama: FakeOllama) -> None:
    for route, _, minimal, upstream, table in ROUTES:
        embed = upstream == "/api/embed"
        for name, row in table.items():
            what = f"{route} {name}"
            model = getattr(row, "model", None) or (EMBED if embed else MODEL)
            extra = {} if isinstance(row, Refused) else row.extra
            body = {"model": model, **minimal, **extra, name: row.value}
            if embed and name not in ("input", "prompt"):  # a text not embedded yet (vectors are cached)
                text = f"{what} {len(fake_ollama.calls)}"
                body |= {"input": text} if "input" in minimal else {"prompt": text}
            before = len(fake_ollama.calls)
            answer = await stack.post(route, json=body)
            if isinstance(row, Refused):
                assert answer.status_code == 400, what
                error = answer.json()["error"]
                if route.startswith("/openai/"):
                    assert (error["code"], error["param"]) == ("unsupported", name), what
                else:
                    assert f"`{name}` is not supported" in error, what
                assert len(fake_ollama.calls) == before, what  # refused before anything is queued
                continue
            assert answer.status_code == 200, (what, answer.text)
            if isinstance(row, Carried):
                sent = [c.body for c in fake_ollama.calls[before:] if c.path == upstream]
                assert sent, (
                    what,
                    body,
                    answer.text[:300],
                    [(c.path, c.body) for c in fake_ollama.calls[before - 2 :]],
                )
                assert row.check(sent[-1]), (what, sent[-1])


# -- the fields of a chat message (and of an OpenAI content part), walked the same way


@dataclass
class InMessages:
    """Requests with these `messages` (the field in use): carried when `check` holds for the
    backend's body, refused (`400 unsupported` naming `refused`, the field's path) otherwise."""

    messages: list[dict[str, Any]]
    check: Upstream | None = None
    refused: str | None = None
    model: str | None = None


USER = {"role": "user", "content": "Weather in Paris?"}
DATA_URL = f"data:image/png;base64,{IMAGE}"
OPENAI_CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
OLLAMA_CALL = {"id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
OPENAI_ROUND_TRIP = [
    USER,
    {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]
ARGUMENTS = at("messages", 1, "tool_calls", 0, "function", "arguments", equals={"city": "Paris"})


def parts(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "hi"}, *extra]}]


OPENAI_MESSAGE: dict[str, InMessages] = {
    "role": InMessages(
        [{"role": "developer", "content": "be brief"}, USER], at("messages", 0, "role", equals="system")
    ),
    "content": InMessages([USER], at("messages", 0, "content", equals="Weather in Paris?")),
    "tool_calls": InMessages(OPENAI_ROUND_TRIP, ARGUMENTS),
    "tool_call_id": InMessages(OPENAI_ROUND_TRIP, at("messages", 2, "tool_name", equals="get_weather")),
    "name": InMessages([USER | {"name": "bob"}], refused="messages[0].name"),
    "refusal": InMessages(
        [USER, {"role": "assistant", "content": "x", "refusal": "no"}], refused="messages[1].refusal"
    ),
    "audio": InMessages(
        [USER, {"role": "assistant", "content": "x", "audio": {"id": "a1"}}], refused="messages[1].audio"
    ),
    "function_call": InMessages(
        [USER, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}],
        refused="messages[1].function_call",
    ),
}

OPENAI_CONTENT_PART: dict[str, InMessages] = {
    "type": InMessages(parts(), at("messages", 0, "content", equals="hi")),
    "text": InMessages(parts({"type": "text", "text": "!"}), at("messages", 0, "content", equals="hi!")),
    "image_url": InMessages(
        parts({"type": "image_url", "image_url": {"url": DATA_URL, "detail": "low"}}),
        at("messages", 0, "images", equals=[IMAGE]),
        model=VISION,
    ),
    "refusal": InMessages(
        [USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
        at("messages", 1, "content", equals="no"),
    ),
    "input_audio": InMessages(
        parts({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
        refused="messages[0].content[1].type",
    ),
    "file": InMessages(
        parts({"type": "file", "file": {"file_data": "AAAA"}}), refused="messages[0].content[1].type"
    ),
}

_OLLAMA_ROUND_TRIP = [
    USER,
    {"role": "assistant", "content": "", "thinking": "look it up", "tool_calls": [OLLAMA_CALL]},
    {"role": "tool", "tool_name": "get_weather", "tool_call_id": "c1", "content": "sunny"},
]

OLLAMA_MESSAGE: dict[str, InMessages] = {
    "role": InMessages(
        [{"role": "system", "content": "be brief"}, USER], at("messages", 0, "role", equals="system")
    ),
    "content": InMessages([USER], at("messages", 0, "content", equals="Weather in Paris?")),
    "images": InMessages(
        [USER | {"images": [IMAGE]}], at("messages", 0, "images", equals=[IMAGE]), model=VISION
    ),
    "thinking": InMessages(_OLLAMA_ROUND_TRIP, at("messages", 1, "thinking", equals="look it up")),
    "tool_calls": InMessages(_OLLAMA_ROUND_TRIP, ARGUMENTS),
    "tool_name": InMessages(_OLLAMA_ROUND_TRIP, at("messages", 2, "tool_name", equals="get_weather")),
    "tool_call_id": InMessages(_OLLAMA_ROUND_TRIP, at("messages", 2, "tool_call_id", equals="c1")),
}

NATIVE_MESSAGE: dict[str, InMessages] = OLLAMA_MESSAGE  # the bus's Message has Ollama's fields

# route, the message Struct, the request's other fields, the table
MESSAGE_ROUTES: list[tuple[str, type[msgspec.Struct], dict[str, Any], dict[str, InMessages]]] = [
    ("/openai/v1/chat/completions", openai_bodies.ChatMessage, {}, OPENAI_MESSAGE),
    ("/openai/v1/chat/completions", openai_bodies.ContentPart, {}, OPENAI_CONTENT_PART),
    ("/ollama/api/chat", ollama_bodies.OllamaMessage, {"stream": False}, OLLAMA_MESSAGE),
    ("/v1/chat", contracts.Message, {}, NATIVE_MESSAGE),
]


def test_every_message_field_is_in_the_table() -> None:
    for route, message, _, table in MESSAGE_ROUTES:
        assert set(message.__struct_fields__) == set(table), (
            f"{route} {message.__name__}: decide (docs/contract.md)"
        )


async def test_each_message_field_is_carried_or_refused(
    stack: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    for route, message, extra, table in MESSAGE_ROUTES:
        for name, row in table.items():
            what = f"{route} {message.__name__}.{name}"
            body = {"model": row.model or MODEL, "messages": row.messages, **extra}
            before = len(fake_ollama.calls)
            answer = await stack.post(route, json=body)
            if row.refused is not None:
                assert answer.status_code == 400, (what, answer.text)
                error = answer.json()["error"]
                if route.startswith("/openai/"):
                    assert (error["code"], error["param"]) == ("unsupported", row.refused), what
                else:
                    assert f"`{row.refused}` is not supported" in error, what
                assert len(fake_ollama.calls) == before, what
                continue
            assert answer.status_code == 200, (what, answer.text)
            sent = [c.body for c in fake_ollama.calls[before:] if c.path == "/api/chat"]
            assert sent and row.check is not None and row.check(sent[-1]), (what, sent[-1:])
