"""Ollama-compatible routes under `/ollama`: point `OLLAMA_HOST` at the edge and nothing else changes.

Streaming answers are NDJSON with Ollama's field names and final statistics (durations in
nanoseconds); errors are `{"error": "..."}` with the status Ollama would use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.params import JSONBody
from litestar.response import Stream

from contracts import Done, Error, ErrorCode, Format, GenerateRequest, LlmbusError, Message, Options, Token
from services.edge.compat.events import events
from services.edge.dispatch import Dispatcher, EventFeed
from services.edge.errors import Failure, handlers, request_id_of
from services.edge.hangup import ClientGone, unless_client_leaves

VERSION = "0.12.0"  # the Ollama API version whose shapes these routes follow

_encode = msgspec.json.Encoder().encode
_OPTION_FIELDS = frozenset(Options.__struct_fields__)


class OllamaMessage(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class _Common(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = True  # Ollama streams unless told not to
    format: Format | Literal[""] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None

    def wire_options(self) -> Options:
        # Ollama ignores options it does not know; so do we, instead of refusing a working client.
        known = {k: v for k, v in (self.options or {}).items() if k in _OPTION_FIELDS}
        try:
            return msgspec.convert(known, Options)
        except msgspec.ValidationError as exc:
            raise LlmbusError(ErrorCode.BAD_REQUEST, f"invalid options: {exc}") from exc

    def wire_format(self) -> Format | None:
        return self.format or None


class ChatBody(_Common, kw_only=True):
    messages: list[OllamaMessage]

    def to_request(self, request_id: str) -> GenerateRequest:
        messages = [Message(role=m.role, content=m.content, images=m.images) for m in self.messages]
        return GenerateRequest(
            id=request_id,
            model=self.model,
            messages=messages,
            options=self.wire_options(),
            format=self.wire_format(),
        )


class GenerateBody(_Common, kw_only=True):
    prompt: str
    system: str | None = None

    def to_request(self, request_id: str) -> GenerateRequest:
        return GenerateRequest(
            id=request_id,
            model=self.model,
            prompt=self.prompt,
            system=self.system,
            options=self.wire_options(),
            format=self.wire_format(),
        )


def ollama_error(failure: Failure, request_id: str) -> Response[bytes]:
    return Response(
        _encode({"error": failure.message}),
        status_code=failure.status,
        media_type="application/json",
        headers={"X-Request-Id": request_id},
    )


class _Shape:
    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model

    def piece(self, text: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out["done"] = False
        return out

    def final(self, done: Done, text: str = "") -> dict[str, Any]:
        out = self.piece(text)
        total_ns = int(done.timings.total_ms * 1e6)
        speed = done.timings.tokens_per_s
        eval_ns = int(done.usage.completion_tokens / speed * 1e9) if speed else total_ns
        first_ns = int((done.timings.ttft_ms or 0) * 1e6)
        out.update(
            done=True,
            done_reason=done.finish_reason,
            total_duration=total_ns,
            load_duration=0,
            prompt_eval_count=done.usage.prompt_tokens,
            prompt_eval_duration=first_ns,
            eval_count=done.usage.completion_tokens,
            eval_duration=eval_ns,
        )
        return out


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


async def _answer(
    request: Request[Any, Any, Any], body: ChatBody | GenerateBody, chat: bool
) -> Response[bytes] | Stream:
    request_id = request_id_of(request)
    wire = body.to_request(request_id)
    wire.validate()
    dispatcher: Dispatcher = request.app.state.dispatcher
    feed = await dispatcher.submit(wire)
    shape = _Shape(chat, body.model)
    if body.stream:
        return Stream(
            _ndjson(feed, shape), media_type="application/x-ndjson", headers={"X-Request-Id": request_id}
        )
    try:
        result = await unless_client_leaves(request, feed, _collect(feed))
    except ClientGone:
        return Response(b"", status_code=499)
    if isinstance(result, Error):
        return ollama_error(Failure(result.code, result.message, result.code.http_status), request_id)
    text, done = result
    return Response(
        _encode(shape.final(done, text)), media_type="application/json", headers={"X-Request-Id": request_id}
    )


async def _collect(feed: EventFeed) -> tuple[str, Done] | Error:
    parts: list[str] = []
    async for event in events(feed):
        if isinstance(event, Token):
            parts.append(event.text)
        elif isinstance(event, Done):
            return "".join(parts), event
        elif isinstance(event, Error):
            return event
    raise RuntimeError("event feed ended without a terminal event")


async def _ndjson(feed: EventFeed, shape: _Shape) -> AsyncIterator[bytes]:
    try:
        async for event in events(feed):
            if isinstance(event, Token):
                yield _encode(shape.piece(event.text)) + b"\n"
            elif isinstance(event, Done):
                yield _encode(shape.final(event)) + b"\n"
            elif isinstance(event, Error):
                yield _encode({"error": event.message}) + b"\n"  # Ollama's in-stream error line
    finally:
        feed.close()


@post("/api/chat", summary="Ollama-compatible chat", status_code=200)
async def chat(request: Request[Any, Any, Any], data: JSONBody[ChatBody]) -> Response[bytes] | Stream:
    return await _answer(request, data, chat=True)


@post("/api/generate", summary="Ollama-compatible generate", status_code=200)
async def generate(request: Request[Any, Any, Any], data: JSONBody[GenerateBody]) -> Response[bytes] | Stream:
    return await _answer(request, data, chat=False)


@get("/api/version", summary="Ollama-compatible version")
async def version() -> dict[str, str]:
    return {"version": VERSION}


@get("/", summary="Ollama's liveness answer", media_type="text/plain")
async def root() -> str:
    return "Ollama is running"


router = Router(
    path="/ollama",
    route_handlers=[chat, generate, version, root],
    tags=["Ollama-compatible"],
    exception_handlers=handlers(ollama_error),  # type: ignore[arg-type]
)
