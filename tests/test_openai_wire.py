"""The OpenAI-compatible wire: what a request becomes, and how a streamed answer's tool calls,
reasoning and logprobs come back as pieces (no server: these are the parsing rules)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from contracts import (
    ErrorCode,
    GenerateRequest,
    LlmbusError,
    Message,
    NamedTool,
    Tool,
    ToolCall,
    ToolCallFunction,
    ToolFunction,
)
from services.runtime.backends import Scored, Thought
from services.runtime.backends.openai_wire import Assembler, Capabilities, Choice, request_body

WEATHER = Tool(function=ToolFunction(name="get_weather", parameters={"type": "object"}))


def call(index: int, **fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, **fields}]}


def _stream(request: GenerateRequest, *deltas: dict[str, Any], finish: str = "tool_calls") -> list[object]:
    assembler = Assembler(request)
    pieces: list[object] = []
    for delta in deltas:
        pieces += assembler.pieces(msgspec.convert({"delta": delta}, Choice))
    last = msgspec.convert({"delta": {}, "finish_reason": finish}, Choice)
    return [*pieces, *assembler.pieces(last), *assembler.finish()]


CHAT = GenerateRequest(
    id="wire-test-1", model="m", messages=[Message(role="user", content="hi")], tools=[WEATHER]
)


def test_streamed_tool_call_deltas_become_whole_calls_each_once() -> None:
    pieces = _stream(
        CHAT,
        {"reasoning_content": "they want weather"},
        call(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""}),
        call(0, function={"arguments": '{"city": '}),
        call(0, function={"arguments": '"Paris"}'}),
        call(1, id="call_b", function={"name": "get_weather", "arguments": '{"city": "Rome"}'}),
    )
    assert pieces[0] == Thought("they want weather")
    calls = [p for p in pieces if isinstance(p, ToolCall)]
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_weather", {"city": "Rome"}),
    ]
    # The first call is complete (and sent) as soon as the second begins, not at the end.
    assert pieces.index(calls[0]) == 1


def test_a_call_whose_arguments_are_not_a_json_object_is_a_backend_error() -> None:
    with pytest.raises(LlmbusError) as caught:
        _stream(
            CHAT, {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a": '}}]}
        )
    assert caught.value.code is ErrorCode.BACKEND_ERROR


def test_logprobs_in_either_shape_become_scored_text() -> None:
    request = msgspec.structs.replace(CHAT, logprobs=True, top_logprobs=1)
    modern = {
        "content": [{"token": "Hi", "logprob": -0.5, "top_logprobs": [{"token": "Hi", "logprob": -0.5}]}]
    }
    legacy = {"tokens": ["Hi"], "token_logprobs": [-0.5], "top_logprobs": [{"Hi": -0.5}]}
    for logprobs in (modern, legacy):
        choice = msgspec.convert({"text": "Hi", "logprobs": logprobs}, Choice)
        [piece] = Assembler(request).pieces(choice)
        assert isinstance(piece, Scored) and piece.text == "Hi"
        [lp] = piece.logprobs
        assert (lp.token, lp.logprob, [t.token for t in lp.top_logprobs or []]) == ("Hi", -0.5, ["Hi"])


def test_the_chat_body_carries_tools_the_round_trip_think_and_logprobs() -> None:
    call = ToolCall(id="call_1", function=ToolCallFunction(name="get_weather", arguments={"city": "P"}))
    request = GenerateRequest(
        id="wire-test-2",
        model="m",
        messages=[
            Message(role="user", content="weather?", images=["iVBORw0KGgo="]),
            Message(role="assistant", tool_calls=[call], thinking="hmm"),
            Message(role="tool", content="sunny", tool_name="get_weather"),
        ],
        tools=[WEATHER],
        tool_choice=NamedTool(name="get_weather"),
        parallel_tool_calls=False,
        think="low",
        logprobs=True,
        top_logprobs=2,
    )
    body = request_body(request, Capabilities())
    user, assistant, tool = body["messages"]
    assert user["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    assert assistant["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "P"})},
        }
    ]
    assert assistant["reasoning_content"] == "hmm"
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert (body["parallel_tool_calls"], body["reasoning_effort"]) == (False, "low")
    assert (body["logprobs"], body["top_logprobs"]) == (True, 2)
    off = request_body(msgspec.structs.replace(request, think=False), Capabilities())
    assert off["chat_template_kwargs"] == {"enable_thinking": False}


def test_the_completions_body_takes_a_top_level_json_schema_and_refuses_what_it_cannot_carry() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    prompt = GenerateRequest(id="wire-test-3", model="m", prompt="x", format=schema, logprobs=True)
    body = request_body(prompt, Capabilities())
    assert body["json_schema"] == schema and body["logprobs"] == 1
    assert request_body(msgspec.structs.replace(prompt, format="json"), Capabilities())["json_schema"] == {
        "type": "object"
    }
    for field, value in (("images", ["iVBORw0KGgo="]), ("suffix", "end"), ("think", True)):
        with pytest.raises(LlmbusError) as caught:
            request_body(msgspec.structs.replace(prompt, **{field: value}), Capabilities())
        assert caught.value.code is ErrorCode.UNSUPPORTED and f"`{field}`" in caught.value.message
