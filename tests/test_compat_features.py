"""Tools, images, thinking and logprobs through the official `openai` and `ollama` clients: the
edge's dialects, the bus, the generator and the fake Ollama, which records what reached it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from services.generator.main import Generator
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.test_bus_features import IMAGE, THINKER, VISION, WEATHER

MODEL = "llama3.2:1b"
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def fake(fake_ollama: FakeOllama) -> FakeOllama:
    fake_ollama.config.models += [VISION, THINKER]
    return fake_ollama


@pytest.fixture
async def oa(edge: Edge, generator: Generator, fake: FakeOllama) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def ol(edge: Edge, generator: Generator, fake: FakeOllama) -> AsyncIterator[ollama.AsyncClient]:
    api = ollama.AsyncClient(host=f"{edge.url}/ollama")
    yield api
    await api._client.aclose()


def last_body(fake: FakeOllama, path: str = "/api/chat") -> dict[str, Any]:
    body: dict[str, Any] = [c for c in fake.calls if c.path == path][-1].body
    return body


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_tool_call_round_trip(oa: openai.AsyncOpenAI, fake: FakeOllama, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "tool_choice": "auto"}
    if stream:
        calls: dict[int, dict[str, Any]] = {}
        finish = None
        async for chunk in await oa.chat.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                for delta in choice.delta.tool_calls or ():
                    assert delta.function is not None
                    calls[delta.index] = {
                        "id": delta.id,
                        "name": delta.function.name,
                        "args": delta.function.arguments,
                    }
                finish = choice.finish_reason or finish
        [call] = calls.values()
        call_id, name, arguments = call["id"], call["name"], call["args"]
    else:
        answer = await oa.chat.completions.create(**kwargs)
        finish = answer.choices[0].finish_reason
        [made] = answer.choices[0].message.tool_calls or []
        call_id, name, arguments = made.id, made.function.name, made.function.arguments  # type: ignore[union-attr]
    assert finish == "tool_calls"
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "x"}
    assert last_body(fake)["tools"][0]["function"]["name"] == "get_weather"

    # The round trip: the assistant's call (arguments a JSON string) and the tool's answer.
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
    ]
    final = await oa.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])  # type: ignore[arg-type]
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content
    sent = last_body(fake)["messages"]
    function = sent[1]["tool_calls"][0]["function"]
    assert (function["name"], function["arguments"]) == ("get_weather", {"city": "x"})
    assert sent[2]["role"] == "tool"
    assert sent[2]["tool_name"] == "get_weather"


async def test_openai_image_thinking_and_logprobs(oa: openai.AsyncOpenAI, fake: FakeOllama) -> None:
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}"}},
    ]
    seen = await oa.chat.completions.create(model=VISION, messages=[{"role": "user", "content": parts}])  # type: ignore[list-item]
    assert seen.choices[0].message.content
    assert last_body(fake)["messages"][0] == {"role": "user", "content": "What is this?", "images": [IMAGE]}

    url = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(openai.BadRequestError) as remote:
        await oa.chat.completions.create(model=VISION, messages=[{"role": "user", "content": [url]}])  # type: ignore[list-item]
    assert remote.value.code == "unsupported"
    assert remote.value.param == "messages[0].content[0].image_url"

    answer = await oa.chat.completions.create(
        model=THINKER, messages=ASK, reasoning_effort="high", logprobs=True, top_logprobs=2
    )
    message: Any = answer.choices[0].message
    assert message.reasoning_content and message.reasoning_content.strip() not in (message.content or "")
    assert last_body(fake)["think"] == "high"
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert "".join(lp.token for lp in content) == message.content
    assert len(content[0].top_logprobs) == 2

    thinking, text, scored = [], [], []
    async for chunk in await oa.chat.completions.create(
        model=THINKER, messages=ASK, reasoning_effort="low", logprobs=True, stream=True
    ):
        for choice in chunk.choices:
            delta: Any = choice.delta
            thinking.append(getattr(delta, "reasoning_content", None) or "")
            text.append(delta.content or "")
            scored += choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
    assert "".join(thinking) == message.reasoning_content  # the same deterministic reasoning
    assert "".join(lp.token for lp in scored) == "".join(text)


async def test_openai_completions_logprobs_echo_and_suffix(oa: openai.AsyncOpenAI, fake: FakeOllama) -> None:
    answer = await oa.completions.create(
        model="qwen2.5-coder:1.5b", prompt="def f(", suffix="return 1", logprobs=1
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None
    assert "".join(choice.logprobs.tokens or []) == choice.text
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs or [])
    body = last_body(fake, "/api/generate")
    assert (body["suffix"], body["logprobs"], body["top_logprobs"]) == ("return 1", True, 1)

    echoed = await oa.completions.create(model=MODEL, prompt="Once", echo=True, max_tokens=2)
    assert echoed.choices[0].text.startswith("Once")
    pieces = [
        c.choices[0].text
        async for c in await oa.completions.create(
            model=MODEL, prompt="Once", echo=True, max_tokens=2, stream=True
        )
    ]
    assert "".join(pieces) == echoed.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
async def test_ollama_tool_call_round_trip(ol: ollama.AsyncClient, fake: FakeOllama, stream: bool) -> None:
    if stream:
        calls = [
            call
            async for part in await ol.chat(model=MODEL, messages=ASK, tools=[WEATHER], stream=True)
            for call in part.message.tool_calls or ()
        ]
    else:
        answer = await ol.chat(model=MODEL, messages=ASK, tools=[WEATHER])
        assert answer.done_reason == "stop"
        calls = list(answer.message.tool_calls or ())
    [call] = calls
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "x"}

    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
    ]
    final = await ol.chat(model=MODEL, messages=history, tools=[WEATHER])
    assert final.message.content and not final.message.tool_calls
    sent = last_body(fake)["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "x"}
    assert (sent[2]["role"], sent[2]["tool_name"]) == ("tool", "get_weather")


async def test_ollama_images_thinking_and_logprobs(ol: ollama.AsyncClient, fake: FakeOllama) -> None:
    answer = await ol.generate(model=VISION, prompt="What is this?", images=[IMAGE])
    assert answer.response
    assert last_body(fake, "/api/generate")["images"] == [IMAGE]

    chat = await ol.chat(model=THINKER, messages=ASK, think=True, logprobs=True, top_logprobs=1)
    assert chat.message.thinking and chat.message.content
    scored: Any = chat.logprobs
    assert "".join(lp.token for lp in scored) == chat.message.content
    assert last_body(fake)["think"] is True

    thinking = [
        p.thinking or "" async for p in await ol.generate(model=THINKER, prompt="x", think=True, stream=True)
    ]
    assert "".join(thinking).strip()

    for field, value in (("template", "{{ .Prompt }}"), ("context", [1, 2])):
        with pytest.raises(ollama.ResponseError) as refused:
            await ol.generate(model=MODEL, prompt="x", **{field: value})
        assert refused.value.status_code == 400
        assert f"`{field}` is not supported" in refused.value.error


async def test_errors_in_each_apis_shape_for_unknown_paths_and_bad_bodies(edge: Edge) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as http:
        for method, path in (("GET", "/openai/v1/nope"), ("GET", "/openai/v1/chat/completions")):
            answer = await http.request(method, path)
            assert answer.status_code in (404, 405)
            assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
        bad = await http.post("/openai/v1/chat/completions", json={"model": MODEL})
        assert bad.status_code == 400
        assert "`data`" not in bad.json()["error"]["message"]
        for method, path in (("GET", "/ollama/api/nope"), ("GET", "/ollama/api/chat")):
            answer = await http.request(method, path)
            assert answer.status_code in (404, 405)
            assert isinstance(answer.json()["error"], str)
        bad = await http.post("/ollama/api/generate", json={"prompt": "x"})
        assert bad.status_code == 400
        assert isinstance(bad.json()["error"], str) and "`data`" not in bad.json()["error"]
