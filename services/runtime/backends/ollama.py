"""Ollama's native API: streaming `/api/chat` and `/api/generate` over one pooled client.

Every field of the contract is carried in Ollama's own shape (`api/types.go`): `tools`, the tool
round trip in `messages`, `images`, `think`, `logprobs` / `top_logprobs`, `suffix`, `raw`. What
Ollama has no field for is refused as `unsupported` (`tool_choice` `required` or a named tool,
`parallel_tool_calls: false`), and so is what the model cannot do (Ollama's 400 "… does not
support tools" and the like). Chunks carry `message.thinking`, `message.tool_calls` (each call
complete) and `logprobs`, streamed back as `Thought`, `ToolCall` and `Scored` pieces.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from contracts import (
    ErrorCode,
    GenerateRequest,
    JsonObject,
    LlmbusError,
    Logprob,
    NamedTool,
    ToolCall,
    ToolCallFunction,
)
from services.runtime.backends.base import (
    EmbedResult,
    Final,
    Piece,
    Scored,
    Thought,
    http_failures,
    unsupported,
)
from services.runtime.backends.observed import embedding, generation
from services.runtime.backends.transport import JSON, http_client


class _CallFunction(msgspec.Struct):
    name: str
    arguments: JsonObject = {}


class _Call(msgspec.Struct):
    function: _CallFunction
    id: str = ""  # newer Ollama names its calls


class _ChunkMessage(msgspec.Struct):
    content: str = ""
    thinking: str = ""
    tool_calls: list[_Call] | None = None


class _Chunk(msgspec.Struct):
    """One NDJSON line of Ollama's streaming answer (fields we do not use are skipped)."""

    message: _ChunkMessage | None = None
    response: str | None = None
    thinking: str | None = None  # /api/generate
    logprobs: list[Logprob] | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    error: str | None = None
    model: str | None = None


class _ErrorBody(msgspec.Struct):
    error: str = ""


class _EmbedAnswer(msgspec.Struct):
    embeddings: list[list[float]]
    prompt_eval_count: int = 0


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_embed = msgspec.json.Decoder(_EmbedAnswer).decode
_decode_error = msgspec.json.Decoder(_ErrorBody).decode
_encode = msgspec.json.Encoder().encode


def request_body(request: GenerateRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": request.model, "stream": True}
    if request.messages is not None:
        body["messages"] = _messages(request)
        if request.tools and request.tool_choice != "none":  # "none": the model sees no tools
            if request.tool_choice == "required" or isinstance(request.tool_choice, NamedTool):
                raise unsupported("tool_choice", "Ollama cannot force a tool call (only `auto` or `none`)")
            if request.parallel_tool_calls is False:
                raise unsupported("parallel_tool_calls", "Ollama cannot limit an answer to one tool call")
            body["tools"] = msgspec.to_builtins(request.tools)
    else:
        body["prompt"] = request.prompt
        for name in ("system", "suffix", "raw", "images"):
            if (value := getattr(request, name)) is not None:
                body[name] = value
    options = msgspec.to_builtins(request.options)
    if options:
        body["options"] = options
    for name in ("format", "think", "logprobs", "top_logprobs"):
        if (value := getattr(request, name)) is not None:
            body[name] = value
    return body


def _messages(request: GenerateRequest) -> list[dict[str, Any]]:
    """The messages in Ollama's shape; a tool result without `tool_name` gets the name of the call
    it answers (Ollama's templates render the name, OpenAI clients send only `tool_call_id`)."""
    messages = request.messages or []
    names = {call.id: call.function.name for m in messages for call in m.tool_calls or ()}
    out: list[dict[str, Any]] = msgspec.to_builtins(messages)
    for message, raw in zip(messages, out, strict=True):
        if message.tool_calls:
            raw["tool_calls"] = [
                {
                    "id": c.id,
                    "function": {"index": i, "name": c.function.name, "arguments": c.function.arguments},
                }
                for i, c in enumerate(message.tool_calls)
            ]
        if message.role == "tool" and message.tool_name is None and message.tool_call_id in names:
            raw["tool_name"] = names[message.tool_call_id]
    return out


# Ollama's capability names (`model.Capability`) in "… does not support <capability>", and the
# contract field that asked for each.
_CAPABILITY_FIELDS = {"tools": "tools", "vision": "images", "thinking": "think", "insert": "suffix"}


def error_for_status(status: int, body: bytes, model: str) -> LlmbusError:
    try:
        detail = _decode_error(body).error or body.decode(errors="replace")
    except msgspec.DecodeError:
        detail = body.decode(errors="replace")[:500]
    if status == 404:
        return LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} not found on the backend")
    _, sep, capability = detail.rpartition("does not support ")
    if sep and (field := _CAPABILITY_FIELDS.get(capability.strip().strip(".'\"").lower())):
        return unsupported(field, f"model {model!r} does not support {capability.strip()}")
    if "missing data required for image input" in detail:  # older Ollama, a text-only model
        return unsupported("images", f"model {model!r} does not take images")
    if status == 400:
        return LlmbusError(ErrorCode.BAD_REQUEST, f"backend rejected the request: {detail}")
    return LlmbusError(ErrorCode.BACKEND_ERROR, f"backend answered {status}: {detail}")


class OllamaBackend:
    def __init__(self, url: str, *, connect_timeout: float = 5.0, max_connections: int = 256) -> None:
        self.url = url.rstrip("/")
        self._client = http_client(self.url, connect_timeout=connect_timeout, max_connections=max_connections)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def version(self) -> str:
        try:
            response = await self._client.get("/api/version", timeout=3.0)
            response.raise_for_status()
            return str(response.json().get("version", "unknown"))
        except (httpx.HTTPError, ValueError) as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, f"Ollama at {self.url} is unreachable: {exc!r}"
            ) from exc

    @embedding("ollama")
    async def embed(
        self, model: str, inputs: list[str], *, truncate: bool | None = None, dimensions: int | None = None
    ) -> EmbedResult:
        body: dict[str, Any] = {"model": model, "input": inputs}
        if truncate is not None:
            body["truncate"] = truncate
        if dimensions is not None:
            body["dimensions"] = dimensions
        with http_failures(self.url, "embedding call"):
            response = await self._client.post("/api/embed", content=_encode(body), headers=JSON)
            if response.status_code != 200:
                raise error_for_status(response.status_code, response.content, model)
            answer = _decode_embed(response.content)
        if len(answer.embeddings) != len(inputs):
            raise LlmbusError(
                ErrorCode.BACKEND_ERROR,
                f"backend returned {len(answer.embeddings)} embeddings for {len(inputs)} inputs",
            )
        return EmbedResult(vectors=answer.embeddings, prompt_tokens=answer.prompt_eval_count)

    @generation("ollama")
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Piece]:
        path = "/api/chat" if request.is_chat else "/api/generate"
        body = _encode(request_body(request))
        with http_failures(self.url, "backend stream"):
            async with self._client.post_stream(path, body) as response:
                if response.status_code != 200:
                    raise error_for_status(response.status_code, await response.aread(), request.model)
                lines = _ndjson(self._client.chunks(response))
                async for line in lines:
                    chunk = _decode_chunk(line)
                    if chunk.error is not None:
                        raise LlmbusError(ErrorCode.BACKEND_ERROR, f"backend error: {chunk.error}")
                    message = chunk.message
                    thinking = message.thinking if message is not None else chunk.thinking
                    if thinking:
                        yield Thought(thinking)
                    text = message.content if message is not None else chunk.response
                    if chunk.logprobs:
                        yield Scored(text or "", chunk.logprobs)
                    elif text:
                        yield text
                    if message is not None and message.tool_calls:
                        for call in message.tool_calls:
                            yield ToolCall(
                                id=call.id,
                                function=ToolCallFunction(call.function.name, call.function.arguments),
                            )
                    if chunk.done:
                        async for _ in lines:  # read to the end, so the pool keeps the connection
                            pass
                        speed = (
                            chunk.eval_count / (chunk.eval_duration / 1e9) if chunk.eval_duration else None
                        )
                        yield Final(
                            finish_reason=chunk.done_reason or "stop",
                            prompt_tokens=chunk.prompt_eval_count,
                            completion_tokens=chunk.eval_count,
                            tokens_per_s=speed,
                            model=chunk.model,
                        )
                        return
                raise LlmbusError(ErrorCode.BACKEND_ERROR, "backend closed the stream before it was done")


async def _ndjson(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Splits a byte stream into lines without decoding to str (msgspec parses bytes directly)."""
    rest = b""
    async for chunk in chunks:
        *lines, rest = (rest + chunk if rest else chunk).split(b"\n")
        for line in lines:
            if line:
                yield line
    if rest.strip():
        yield rest
