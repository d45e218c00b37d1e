"""OpenAI-compatible routes under `/openai/v1`: chat completions, completions and embeddings.

(`GET /openai/v1/models` is served with `/v1/models`, in services/edge/models.py; `GET
/openai/v1/models/{id}` here, so an unknown model is a 404 in OpenAI's error shape.)

Streaming answers are `data: {chunk}` lines ending with `data: [DONE]`, as the OpenAI SDKs expect;
errors use OpenAI's `{"error": {"message", "type", "param", "code"}}` shape.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import msgspec
from litestar import Response, Router, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from contracts import Completion, Done, EmbedResponse, Error, ErrorCode, LlmbusError, Token
from contracts.messages import Thinking, ToolCallEvent
from contracts.queue import Queued
from contracts.route import Routed
from contracts.tools import Logprob, ToolCall
from services.edge.compat.events import Seamless
from services.edge.compat.fields import dumps
from services.edge.compat.openai_bodies import (
    ChatCompletionBody,
    CompletionBody,
    EmbeddingsBody,
    image_urls,
)
from services.edge.embed import Embedding, embed_with
from services.edge.errors import Failure, handlers
from services.edge.generation import collect
from services.edge.image_fetch import ImageFetcher, decoded_size, too_large
from services.edge.models import ModelEntry, model_entry
from services.edge.serve import Answer, Dialect, Piped, Pipeline, Source
from services.runtime.events import RawEvent
from services.runtime.inventory import InventoryView
from services.runtime.settings import Settings

_encode = msgspec.json.Encoder().encode
Inventory = NamedDependency[InventoryView]


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(failure: Failure, request_id: str) -> Response[bytes]:
    body = {
        "error": {
            "message": failure.message,
            "type": _ERROR_TYPES.get(failure.status, "server_error"),
            "param": failure.param,
            "code": failure.code.value,
        }
    }
    return Response(
        _encode(body),
        status_code=failure.status,
        media_type="application/json",
        headers={"X-Request-Id": request_id},
    )


class _Shape:
    """Builds one endpoint's objects: `chat.completion(.chunk)` or `text_completion`."""

    def __init__(self, chat: bool, request_id: str, model: str, echo: str = "") -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.echo = echo  # completions' `echo`: the prompt, before the answer's text
        self.offset = len(echo)  # a legacy logprobs' `text_offset` of the next token

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None) -> bytes:
        """A chat chunk with `delta`, or a completion chunk with `delta["content"]` as its text."""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            if logprobs is not None:
                choice["logprobs"] = logprobs
            obj = "chat.completion.chunk"
        else:
            text = delta.get("content") or ""
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "text_completion"
        return self._data(
            {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        )

    def token(self, event: Token) -> bytes:
        logprobs = None if event.logprobs is None else self.logprobs(event.logprobs)
        return self.chunk({"content": event.text}, logprobs=logprobs)

    def logprobs(self, scored: list[Logprob]) -> dict[str, Any]:
        """Chat's `{content: [...]}`, or completions' legacy `{tokens, token_logprobs, ...}`."""
        if self.chat:
            return {"content": [_chat_logprob(lp) for lp in scored], "refusal": None}
        offsets = []
        for lp in scored:
            offsets.append(self.offset)
            self.offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in scored],
            "token_logprobs": [lp.logprob for lp in scored],
            "top_logprobs": [{t.token: t.logprob for t in lp.top_logprobs or ()} for lp in scored],
            "text_offset": offsets,
        }

    def usage_chunk(self, done: Done) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._data(
            {
                "id": self.id,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": msgspec.to_builtins(done.usage),
            }
        )

    def whole(self, answer: Completion) -> dict[str, Any]:
        logprobs = None if answer.logprobs is None else self.logprobs(answer.logprobs)
        finish = _finish_reason(answer.finish_reason)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": answer.text}
            if answer.thinking is not None:
                message["reasoning_content"] = answer.thinking
            if answer.tool_calls:
                message["tool_calls"] = [_call(call) for call in answer.tool_calls]
                message["content"] = answer.text or None
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
            choice["logprobs"] = logprobs
            obj = "chat.completion"
        else:
            text = self.echo + answer.text
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": answer.model,
            "choices": [choice],
            "usage": msgspec.to_builtins(answer.usage),
        }

    @staticmethod
    def _data(obj: dict[str, Any]) -> bytes:
        return b"data: " + _encode(obj) + b"\n\n"


def _finish_reason(reason: str) -> str:
    return reason  # the bus's reasons ("stop", "length", "tool_calls") are OpenAI's


def _chat_logprob(lp: Logprob) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": lp.bytes,
        "top_logprobs": [msgspec.to_builtins(t) | {"bytes": t.bytes} for t in lp.top_logprobs or ()],
    }


def _call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {} if index is None else {"index": index}
    fn = call.function
    function = {"name": fn.name, "arguments": dumps(fn.arguments)}
    return out | {"id": call.id, "type": "function", "function": function}


class OpenAI(Dialect):
    """Chat completions and completions: `data: {chunk}` lines, then `data: [DONE]`."""

    error = staticmethod(openai_error)
    status_waits = True

    def __init__(self, shape: _Shape, *, streams: bool, include_usage: bool) -> None:
        self.shape = shape
        self.streams = streams
        self.include_usage = include_usage
        self.events = Seamless()
        self.role_sent = not shape.chat  # a chat stream opens with the role, once the model is known
        self.echo = bool(shape.echo)

    def frame(self, batch: list[RawEvent]) -> bytes:
        shape = self.shape
        out: list[bytes] = []
        for event in self.events.events(batch):
            if isinstance(event, Routed):
                shape.model = event.model  # chunks name the model that answers, as non-streamed ones do
                continue
            if not self.role_sent:
                self.role_sent = True
                out.append(shape.chunk({"role": "assistant", "content": ""}))
            elif self.echo and not shape.chat:
                out.append(shape.chunk({"content": shape.echo}))  # `echo`: the prompt comes first
            self.echo = False
            if isinstance(event, Token):
                out.append(shape.token(event))
            elif isinstance(event, Thinking):
                if shape.chat:  # completions have no place for reasoning (the text never has it)
                    out.append(shape.chunk({"reasoning_content": event.text}))
            elif isinstance(event, ToolCallEvent):
                out.append(shape.chunk({"tool_calls": [_call(event.call, event.index)]}))
            elif isinstance(event, Done):
                finish = _finish_reason(event.finish_reason)
                out.append(shape.chunk({} if shape.chat else {"content": ""}, finish_reason=finish))
                if self.include_usage:
                    out.append(shape.usage_chunk(event))
            elif isinstance(event, Error):
                error = {"message": event.message, "type": "server_error", "code": event.code.value}
                out.append(b"data: " + _encode({"error": error}) + b"\n\n")
        self.ended = self.events.ended
        return b"".join(out)

    def tail(self) -> bytes:
        return b"data: [DONE]\n\n"

    shows_queue = True  # as SSE comments, which OpenAI's clients skip (tests/test_queue_events.py)

    def queued(self, status: Queued) -> bytes:
        return b": queued position=%d ahead=%d running=%d\n\n" % (
            status.position,
            status.ahead,
            status.running,
        )

    async def collect(self, source: Source) -> Completion | Error:
        return await collect(source, self.shape.model)

    def answer(self, result: Completion, request_id: str) -> Response[bytes]:
        return super().answer(self.shape.whole(result), request_id)


async def _answer(pipeline: Pipeline, body: ChatCompletionBody | CompletionBody, chat: bool) -> Answer:
    request_id = pipeline.request_id
    usage = body.stream_options is not None and body.stream_options.include_usage
    if isinstance(body, ChatCompletionBody):
        await _images(pipeline, body)
    wire = body.to_request(request_id)
    echo = wire.prompt or "" if isinstance(body, CompletionBody) and body.echo else ""
    dialect = OpenAI(_Shape(chat, request_id, body.model, echo), streams=body.stream, include_usage=usage)
    return await pipeline.serve(wire, dialect, timeout_s=body.timeout)


async def _images(pipeline: Pipeline, body: ChatCompletionBody) -> None:
    """Each `data:` image within the per-image limit, named as the API names it; http(s) URLs become
    `data:` URLs when the operator allows their hosts, else they stay and `to_request` refuses them."""
    found = image_urls(body.messages)
    if not found:
        return
    limit = pipeline.settings.max_image_bytes
    for where, image in found:
        head, _, payload = image.url.partition(",")
        if head.startswith("data:") and (size := decoded_size(payload)) > limit:
            raise too_large(where, size, limit)
    remote = [(where, image) for where, image in found if image.url.startswith(("http://", "https://"))]
    fetcher = ImageFetcher(pipeline.settings, int(pipeline.request.headers.get("content-length") or 0))
    if remote and fetcher.enabled:
        fetched = await fetcher.fetch_all((where, image.url) for where, image in remote)
        for where, image in remote:
            image.url = fetched[where]


@post("/chat/completions", summary="OpenAI-compatible chat completions", status_code=200)
async def chat_completions(data: JSONBody[ChatCompletionBody], pipeline: Piped) -> Answer:
    return await _answer(pipeline, data, chat=True)


@post("/completions", summary="OpenAI-compatible completions", status_code=200)
async def completions(data: JSONBody[CompletionBody], pipeline: Piped) -> Answer:
    return await _answer(pipeline, data, chat=False)


class OpenAIEmbedding(Embedding):
    error = staticmethod(openai_error)
    status_waits = True

    def __init__(self, settings: Settings, encoding_format: str) -> None:
        super().__init__(settings)
        self.encode = _base64 if encoding_format == "base64" else None

    def answer(self, result: EmbedResponse, request_id: str) -> Response[bytes]:
        encode = self.encode
        body = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(v) if encode else v}
                for i, v in enumerate(result.embeddings)
            ],
            "model": result.model,
            "usage": {
                "prompt_tokens": result.usage.prompt_tokens,
                "total_tokens": result.usage.prompt_tokens,
            },
        }
        return super().answer(body, request_id)


@post("/embeddings", summary="OpenAI-compatible embeddings", status_code=200)
async def embeddings(data: JSONBody[EmbeddingsBody], pipeline: Piped) -> Response[bytes]:
    dialect = OpenAIEmbedding(pipeline.settings, data.encoding_format)
    return await embed_with(pipeline, data.to_request(pipeline.request_id), dialect, data.timeout)


@get("/models/{model_id:path}", summary="OpenAI-compatible model (`models.retrieve`)")
async def retrieve_model(inventory: Inventory, model_id: FromPath[str]) -> ModelEntry:
    name = model_id.lstrip("/")  # a `path` parameter keeps its leading slash
    entry = model_entry(inventory, name) if name else None
    if entry is None:
        raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"The model `{name}` does not exist")
    return entry


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the vector's little-endian float32 bytes (exact: vectors are float32)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


router = Router(
    path="/openai/v1",
    route_handlers=[chat_completions, completions, embeddings, retrieve_model],
    tags=["OpenAI-compatible"],
    exception_handlers=handlers(openai_error),  # type: ignore[arg-type]
)
