"""The OpenAI-compatible request body and the answer's pieces, apart from the HTTP client.

Chat (`/v1/chat/completions`) carries everything: `tools`, `tool_choice`, `parallel_tool_calls`,
the tool round trip (assistant `tool_calls` with arguments as a JSON string, `tool` messages with
`tool_call_id`), images as `image_url` data URLs, earlier reasoning as `reasoning_content`,
`think` (`false`: `chat_template_kwargs.enable_thinking`, a level: `reasoning_effort`), `logprobs`
and `top_logprobs`. Completions (`/v1/completions`, always raw: no template) take `format` as
llama.cpp's top-level `json_schema` (it ignores `response_format` there; vLLM reads that one) and
legacy `logprobs: N`; they have nothing for images, `suffix` or reasoning, which are refused.

Answers come back as `Piece`s: `reasoning_content` (llama.cpp, DeepSeek; vLLM's `reasoning`) as
`Thought`, streamed `delta.tool_calls` assembled per `index` into complete `ToolCall`s, logprobs
(`logprobs.content[]`, or the legacy `tokens`/`token_logprobs`/`top_logprobs`) as `Scored`.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from contracts import (
    ErrorCode,
    GenerateRequest,
    LlmbusError,
    Logprob,
    Message,
    NamedTool,
    TokenLogprob,
    ToolCall,
    ToolCallFunction,
)
from services.runtime.backends.base import Piece, Scored, Thought, unsupported


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timings(msgspec.Struct):
    """llama.cpp's per-request timings (other servers omit them)."""

    predicted_per_second: float | None = None


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _CallDelta(msgspec.Struct):
    """A streamed `delta.tool_calls[]` item, or a whole `message.tool_calls[]` one."""

    index: int = 0
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name
    tool_calls: list[_CallDelta] | None = None


class _Logprobs(msgspec.Struct):
    content: list[Logprob] | None = None  # chat, and llama.cpp's completions
    tokens: list[str] | None = None  # legacy completions ...
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


class Choice(msgspec.Struct):
    delta: _Delta | None = None  # chat, streaming
    message: _Delta | None = None  # chat, not streaming
    text: str | None = None  # completions
    logprobs: _Logprobs | None = None
    finish_reason: str | None = None


class ErrorDetail(msgspec.Struct):
    message: str = ""
    type: str | None = None
    code: int | str | None = None


class Chunk(msgspec.Struct):
    """One SSE `data:` payload, or a whole non-streaming answer (unused fields are skipped)."""

    choices: list[Choice] = []
    usage: Usage | None = None
    timings: Timings | None = None
    error: ErrorDetail | str | None = None
    model: str | None = None  # the model the server says answered


class Capabilities(msgspec.Struct):
    """What llama.cpp's `/props` says the served model can do (other servers: unknown, None)."""

    vision: bool | None = None
    tools: bool | None = None


def _image_url(data: str) -> str:
    # Ollama carries bare base64; OpenAI wants a data URL. The first bytes name the format.
    mime = next((m for prefix, m in _IMAGE_PREFIXES if data.startswith(prefix)), "image/jpeg")
    return f"data:{mime};base64,{data}"


_IMAGE_PREFIXES = (("iVBOR", "image/png"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp"))


def _message(message: Message, call_ids: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
        parts += [{"type": "image_url", "image_url": {"url": _image_url(i)}} for i in message.images]
        out["content"] = parts
    if message.thinking:
        out["reasoning_content"] = message.thinking
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": json.dumps(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.role == "tool":
        # Ollama clients link a result by the tool's name only: the id of the last call of it.
        call_id = message.tool_call_id or call_ids.get(message.tool_name or "")
        if call_id is not None:
            out["tool_call_id"] = call_id
    return out


def _check(request: GenerateRequest, caps: Capabilities) -> None:
    """Refuses what the served model cannot do before the server silently ignores it."""
    if request.messages is not None:
        if caps.vision is False and any(m.images for m in request.messages):
            raise unsupported("images", f"model {request.model!r} on this server takes no images")
        if caps.tools is False and request.tools and request.tool_choice != "none":
            raise unsupported("tools", f"model {request.model!r} on this server does not support tools")
        return
    why = "the OpenAI-compatible /v1/completions has no such field; send `messages`"
    if request.images:
        raise unsupported("images", why)
    if request.suffix:
        raise unsupported("suffix", why)
    if request.think:  # `false` is what /v1/completions does anyway
        raise unsupported("think", why)


def request_body(request: GenerateRequest, caps: Capabilities, *, stream: bool = True) -> dict[str, Any]:
    _check(request, caps)
    body: dict[str, Any] = {"model": request.model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if request.messages is not None:
        call_ids = {c.function.name: c.id for m in request.messages for c in m.tool_calls or ()}
        body["messages"] = [_message(m, call_ids) for m in request.messages]
        _chat_features(request, body)
    else:
        # /v1/completions has no system role: the system text leads the prompt.
        prompt = request.prompt or ""
        body["prompt"] = f"{request.system}\n\n{prompt}" if request.system else prompt
        if request.logprobs:
            body["logprobs"] = request.top_logprobs or 1  # legacy: how many top tokens, 1 at least
    o = request.options
    if o.num_predict is not None and o.num_predict > 0:
        body["max_tokens"] = o.num_predict
    # Standard fields, then the llama.cpp/vLLM extensions (`num_ctx` is a server setting there).
    for name, value in (
        ("temperature", o.temperature),
        ("top_p", o.top_p),
        ("seed", o.seed),
        ("stop", o.stop),
        ("presence_penalty", o.presence_penalty),
        ("frequency_penalty", o.frequency_penalty),
        ("top_k", o.top_k),
        ("min_p", o.min_p),
        ("repeat_penalty", o.repeat_penalty),
    ):
        if value is not None:
            body[name] = value
    if request.format == "json":
        body["response_format"] = {"type": "json_object"}
    elif request.format is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": request.format, "strict": True},
        }
    if request.format is not None and request.messages is None:
        # llama.cpp's /v1/completions constrains only by a top-level `json_schema`.
        body["json_schema"] = {"type": "object"} if request.format == "json" else request.format
    return body


def _chat_features(request: GenerateRequest, body: dict[str, Any]) -> None:
    if request.tools:
        body["tools"] = msgspec.to_builtins(request.tools)
    choice = request.tool_choice
    if isinstance(choice, NamedTool):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    if request.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.think is False:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    elif isinstance(request.think, str):
        body["reasoning_effort"] = request.think
    if request.logprobs is not None:
        body["logprobs"] = request.logprobs
    if request.top_logprobs is not None:
        body["top_logprobs"] = request.top_logprobs


class Assembler:
    """Turns an answer's choices into pieces; streamed tool calls are sent once complete (when the
    next call begins, or at the end), so a call is never delivered in parts."""

    def __init__(self, request: GenerateRequest) -> None:
        self._top = bool(request.top_logprobs)
        self._calls: dict[int, tuple[str, str, list[str]]] = {}  # index -> id, name, argument parts

    def pieces(self, choice: Choice) -> list[Piece]:
        out: list[Piece] = []
        delta = choice.delta or choice.message
        if delta is not None:
            if reasoning := delta.reasoning_content or delta.reasoning:
                out.append(Thought(reasoning))
            text = delta.content
        else:
            text = choice.text
        logprobs = _logprobs(choice.logprobs, self._top) if choice.logprobs is not None else None
        if logprobs:
            out.append(Scored(text or "", logprobs))
        elif text:
            out.append(text)
        for call in (delta.tool_calls if delta is not None else None) or ():
            out += self._complete(below=call.index)
            known = self._calls.get(call.index, ("", "", []))
            function = call.function or _FunctionDelta()
            self._calls[call.index] = (
                known[0] or call.id or "",
                known[1] + (function.name or ""),
                [*known[2], function.arguments or ""],
            )
        return out

    def finish(self) -> list[Piece]:
        """The calls still being assembled: the answer is complete."""
        return self._complete(below=None)

    def _complete(self, below: int | None) -> list[Piece]:
        out: list[Piece] = []
        for index in sorted(self._calls):
            if below is not None and index >= below:
                break
            call_id, name, parts = self._calls.pop(index)
            try:
                arguments = json.loads("".join(parts) or "{}")
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict) or not name:
                raise LlmbusError(
                    ErrorCode.BACKEND_ERROR,
                    f"the model's tool call {name or '(unnamed)'!r} has no JSON object as its arguments",
                )
            out.append(ToolCall(id=call_id, function=ToolCallFunction(name=name, arguments=arguments)))
        return out


def _logprobs(found: _Logprobs, top: bool) -> list[Logprob]:
    if found.content is not None:
        return (
            found.content if top else [msgspec.structs.replace(p, top_logprobs=None) for p in found.content]
        )
    out: list[Logprob] = []
    tops = found.top_logprobs or []
    for i, token in enumerate(found.tokens or ()):
        logprob = (found.token_logprobs or [])[i] if i < len(found.token_logprobs or ()) else None
        if logprob is None:  # an echoed first prompt token has none
            continue
        rivals = tops[i] if i < len(tops) and top else None
        out.append(
            Logprob(
                token=token,
                logprob=logprob,
                top_logprobs=[TokenLogprob(t, lp) for t, lp in rivals.items()] if rivals else None,
            )
        )
    return out
