"""OpenAI-compatible routes under `/openai/v1`: chat completions, completions and embeddings.

(`GET /openai/v1/models` is served with `/v1/models`, in services/edge/models.py.)

Streaming answers are `data: {chunk}` lines ending with `data: [DONE]`, as the OpenAI SDKs expect;
errors use OpenAI's `{"error": {"message", "type", "param", "code"}}` shape.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any, Literal

import msgspec
from litestar import Response, Router, post
from litestar.params import JSONBody

from contracts import (
    Completion,
    Done,
    EmbedRequest,
    EmbedResponse,
    Error,
    ErrorCode,
    GenerateRequest,
    LlmbusError,
    Message,
    Options,
    Token,
)
from contracts.embed import Dimensions
from contracts.route import Routed
from services.edge.compat.events import Seamless
from services.edge.embed import Embedding, embed_with
from services.edge.errors import Failure, handlers
from services.edge.generation import collect
from services.edge.serve import Answer, Dialect, Piped, Pipeline, Source
from services.runtime.events import RawEvent
from services.runtime.settings import Settings

_encode = msgspec.json.Encoder().encode


class _ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = None


class JsonSchemaSpec(msgspec.Struct):
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI's SDKs send many."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int = 1
    timeout: float | None = None

    def options(self) -> Options:
        if self.n != 1:
            raise LlmbusError(ErrorCode.BAD_REQUEST, "only n=1 is supported")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return Options(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            num_predict=self.max_completion_tokens or self.max_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


class ChatCompletionBody(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    response_format: ResponseFormat | None = None

    def to_request(self, request_id: str) -> GenerateRequest:
        fmt: Any = None
        if self.response_format is not None and self.response_format.type == "json_object":
            fmt = "json"
        elif self.response_format is not None and self.response_format.type == "json_schema":
            spec = self.response_format.json_schema
            if spec is None or spec.schema is None:
                raise LlmbusError(ErrorCode.BAD_REQUEST, "response_format.json_schema.schema is required")
            fmt = spec.schema
        return GenerateRequest(
            id=request_id,
            model=self.model,
            options=self.options(),
            format=fmt,
            messages=[Message(role=_role(m.role), content=_text(m.content)) for m in self.messages],
        )


class CompletionBody(_Sampling, kw_only=True):
    prompt: str

    def to_request(self, request_id: str) -> GenerateRequest:
        return GenerateRequest(id=request_id, model=self.model, prompt=self.prompt, options=self.options())


def _role(role: str) -> Literal["system", "user", "assistant", "tool"]:
    return "system" if role == "developer" else role  # type: ignore[return-value]


def _text(content: str | list[_ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text or "" for part in content if part.type == "text")


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
            "param": None,
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

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return self._data(
            {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        )

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
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": answer.finish_reason,
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": answer.text,
                "finish_reason": answer.finish_reason,
                "logprobs": None,
            }
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


class OpenAI(Dialect):
    """Chat completions and completions: `data: {chunk}` lines, then `data: [DONE]`."""

    error = staticmethod(openai_error)

    def __init__(self, shape: _Shape, *, streams: bool, include_usage: bool) -> None:
        self.shape = shape
        self.streams = streams
        self.include_usage = include_usage
        self.events = Seamless()
        self.role_sent = not shape.chat  # a chat stream opens with the role, once the model is known

    def frame(self, batch: list[RawEvent]) -> bytes:
        shape = self.shape
        out: list[bytes] = []
        for event in self.events.events(batch):
            if isinstance(event, Routed):
                shape.model = event.model  # chunks name the model that answers, as non-streamed ones do
                continue
            if not self.role_sent:
                self.role_sent = True
                out.append(shape.chunk(None, first=True))
            if isinstance(event, Token):
                out.append(shape.chunk(event.text))
            elif isinstance(event, Done):
                out.append(shape.chunk(None if shape.chat else "", finish_reason=event.finish_reason))
                if self.include_usage:
                    out.append(shape.usage_chunk(event))
            elif isinstance(event, Error):
                error = {"message": event.message, "type": "server_error", "code": event.code.value}
                out.append(b"data: " + _encode({"error": error}) + b"\n\n")
        self.ended = self.events.ended
        return b"".join(out)

    def tail(self) -> bytes:
        return b"data: [DONE]\n\n"

    async def collect(self, source: Source) -> Completion | Error:
        return await collect(source, self.shape.model)

    def answer(self, result: Completion, request_id: str) -> Response[bytes]:
        return super().answer(self.shape.whole(result), request_id)


async def _answer(pipeline: Pipeline, body: ChatCompletionBody | CompletionBody, chat: bool) -> Answer:
    request_id = pipeline.request_id
    usage = body.stream_options is not None and body.stream_options.include_usage
    dialect = OpenAI(_Shape(chat, request_id, body.model), streams=body.stream, include_usage=usage)
    return await pipeline.serve(body.to_request(request_id), dialect, timeout_s=body.timeout)


@post("/chat/completions", summary="OpenAI-compatible chat completions", status_code=200)
async def chat_completions(data: JSONBody[ChatCompletionBody], pipeline: Piped) -> Answer:
    return await _answer(pipeline, data, chat=True)


@post("/completions", summary="OpenAI-compatible completions", status_code=200)
async def completions(data: JSONBody[CompletionBody], pipeline: Piped) -> Answer:
    return await _answer(pipeline, data, chat=False)


class EmbeddingsBody(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Any]  # text or texts; token arrays are refused (the model has its own tokenizer)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions | None = None
    timeout: float | None = None

    def to_request(self, request_id: str) -> EmbedRequest:
        texts = self.input
        if isinstance(texts, list) and not all(isinstance(text, str) for text in texts):
            raise LlmbusError(
                ErrorCode.BAD_REQUEST,
                "`input` must be a string or a list of strings; token arrays are not supported",
            )
        return EmbedRequest(id=request_id, model=self.model, input=texts, dimensions=self.dimensions)


class OpenAIEmbedding(Embedding):
    error = staticmethod(openai_error)

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


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the vector's little-endian float32 bytes (exact: vectors are float32)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


router = Router(
    path="/openai/v1",
    route_handlers=[chat_completions, completions, embeddings],
    tags=["OpenAI-compatible"],
    exception_handlers=handlers(openai_error),  # type: ignore[arg-type]
)
