"""Seed 003's API (the shared multi-tenant Ollama service): its `/api/v1/...` routes.

Generation: `chat`, `generate` and `vlm` in the seed's native shapes (`{"message"|"text", "model",
"request_id", "latency_ms", ...}`; streams are `data: {"chunk", "done", ...}` lines), and
`chat/completions` and `vlm/openai` in OpenAI's (llmbus's OpenAI dialect). `embeddings` answers
`{"embedding", "model", "prompt", "latency_ms"}`. The model, when a request names none, is the
server's default. Text requests get the seed's 120 s, vision requests its 150 s, and a request
that runs out of time is the seed's `503 request_timeout` with `Retry-After`. Errors are the
seed's `{"error", "error_type", "code", "retry_after", "request_id"}`, body validation is `422`,
and every answer carries `X-Shared-Ollama-Request-Id` besides llmbus's `X-Request-Id`. The model,
system and queue routes are in `shared_admin.py`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec
from litestar import Response
from litestar.params import JSONBody

from contracts import (
    Completion,
    Done,
    EmbedRequest,
    Error,
    ErrorCode,
    Format,
    GenerateRequest,
    LlmbusError,
    Message,
    Options,
    subjects,
)
from contracts.embed import EmbedResponse
from contracts.tools import Tool
from services.edge.compat.fields import data_url_image, unsupported
from services.edge.compat.openai import OpenAI, _Shape
from services.edge.compat.openai_bodies import ChatCompletionBody, ResponseFormat
from services.edge.defaults import default_model
from services.edge.dialects.common import TextDialect, sse_data
from services.edge.dialects.shared_admin import ROUTES as ADMIN_ROUTES
from services.edge.dialects.shared_http import origin, seed_code, shared_post
from services.edge.embed import Embedding
from services.edge.serve import Answer, Piped, Pipeline

_encode = msgspec.json.Encoder().encode

TEXT_TIMEOUT_S = 120.0  # the seed's hard stops
VLM_TIMEOUT_S = 150.0


# -- request bodies (the seed's pydantic models: unknown fields refused)


class _Knobs(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = None
    stream: bool = False
    format: Format | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] | None = None

    def fields(self, request_id: str, model: str) -> dict[str, Any]:
        options = Options(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            num_predict=self.max_tokens,
            seed=self.seed,
            stop=self.stop,
        )
        fmt = self.response_format.format() if self.response_format is not None else self.format
        return {"id": request_id, "model": model, "options": options, "format": fmt}


class SharedMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["user", "assistant", "system", "tool"]
    content: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def to_message(self, index: int) -> Message:
        if self.tool_calls:
            raise LlmbusError(
                ErrorCode.UNSUPPORTED,
                f"`messages[{index}].tool_calls`: earlier calls are not carried back; send them as content",
            )
        return Message(role=self.role, content=self.content or "", tool_call_id=self.tool_call_id)


class GenerateBody(_Knobs, kw_only=True):
    prompt: str
    system: str | None = None


class ChatBody(_Knobs, kw_only=True):
    messages: list[SharedMessage]


class VlmBody(ChatBody, kw_only=True):
    images: list[str]
    # The seed's per-request compression knobs. The server's LLMBUS_IMAGE_* policy decides, so a
    # request that asks for something else is refused, never quietly given the server's policy.
    image_compression: bool = True
    max_dimension: int | None = None
    compression_format: Literal["jpeg", "png", "webp"] | None = None

    def refuse_compression_knobs(self) -> None:
        why = "images are shrunk by the server's policy (LLMBUS_IMAGE_MAX_SIDE, LLMBUS_IMAGE_QUALITY)"
        if not self.image_compression:
            raise unsupported("image_compression", why)
        for name in ("max_dimension", "compression_format"):
            if getattr(self, name) is not None:
                raise unsupported(name, why)


class OpenAIBody(ChatCompletionBody, kw_only=True):
    model: str = ""  # the seed's default model when left out


class EmbeddingsBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    prompt: str
    model: str | None = None


# -- the seed's native shapes


class Native(TextDialect):
    """`chat` and `vlm` (`chat`: true) answer `message`, `generate` answers `text`."""

    def __init__(self, model: str, request_id: str, *, chat: bool, streams: bool) -> None:
        super().__init__(model, streams=streams)
        self.request_id = request_id
        self.chat = chat
        self.started = time.perf_counter()

    def _chunk(self, text: str, **more: Any) -> dict[str, Any]:
        chunk: dict[str, Any] = {"chunk": text}
        if self.chat:
            chunk["role"] = "assistant"
        return chunk | {"done": False, "model": self.model, "request_id": self.request_id} | more

    def _stats(self, done: Done | Completion) -> dict[str, Any]:
        return {
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 2),
            "model_load_ms": None,  # llmbus's events do not say; the janitor keeps models warm
            "model_warm_start": True,
            "prompt_eval_count": done.usage.prompt_tokens,
            "generation_eval_count": done.usage.completion_tokens,
            "total_duration_ms": done.timings.total_ms,
        }

    def token(self, text: str) -> bytes:
        return sse_data(self._chunk(text))

    def done(self, event: Done) -> bytes:
        return sse_data(self._chunk("", done=True, **self._stats(event)))

    def failed(self, event: Error) -> bytes:
        """The seed's in-stream error chunk, with the code and hint its error bodies carry."""
        extra = {"error": event.message, "error_type": "HTTPException", "code": seed_code(event.code)}
        return sse_data(self._chunk("", done=True, retry_after=event.retry_after, **extra))

    def answer(self, result: Completion, request_id: str) -> Response[bytes]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": result.text}
            if result.tool_calls:
                message["tool_calls"] = [msgspec.to_builtins(call) for call in result.tool_calls]
            body: dict[str, Any] = {"message": message}
        else:
            body = {"text": result.text}
        body |= {"model": result.model, "request_id": request_id} | self._stats(result)
        body |= self.extra()
        return Response(_encode(body), media_type="application/json", headers={"X-Request-Id": request_id})

    def extra(self) -> dict[str, Any]:
        return {}


class Vision(Native):
    def __init__(self, model: str, request_id: str, *, streams: bool, images: int) -> None:
        super().__init__(model, request_id, chat=True, streams=streams)
        self.images = images

    def extra(self) -> dict[str, Any]:
        saved = self.shrunk.saved_bytes  # what LLMBUS_IMAGE_* saved, as the seed reported its own
        return {"images_processed": self.images, "compression_savings_bytes": saved or None}


async def _serve(
    pipeline: Pipeline, wire: GenerateRequest, dialect: Native | OpenAI, timeout_s: float
) -> Answer:
    return await pipeline.serve(wire, dialect, timeout_s=timeout_s, origin=origin(pipeline.request))


@shared_post("/api/v1/generate", "text generation")
async def generate(data: JSONBody[GenerateBody], pipeline: Piped) -> Answer:
    if data.tools:  # a prompt request (Ollama's generate) takes no tools: refused, never dropped
        raise LlmbusError(ErrorCode.UNSUPPORTED, "`tools` needs a chat: send them to /api/v1/chat")
    model = data.model or default_model(pipeline.settings)
    fields = data.fields(pipeline.request_id, model)
    wire = GenerateRequest(prompt=data.prompt, system=data.system, **fields)
    dialect = Native(model, wire.id, chat=False, streams=data.stream)
    return await _serve(pipeline, wire, dialect, TEXT_TIMEOUT_S)


@shared_post("/api/v1/chat", "chat (native format)")
async def chat(data: JSONBody[ChatBody], pipeline: Piped) -> Answer:
    model = data.model or default_model(pipeline.settings)
    messages = [m.to_message(i) for i, m in enumerate(data.messages)]
    wire = GenerateRequest(messages=messages, tools=data.tools, **data.fields(pipeline.request_id, model))
    return await _serve(
        pipeline, wire, Native(model, wire.id, chat=True, streams=data.stream), TEXT_TIMEOUT_S
    )


@shared_post("/api/v1/vlm", "vision-language chat (native format: images beside the messages)")
async def vlm(data: JSONBody[VlmBody], pipeline: Piped) -> Answer:
    if not data.images:
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, "`images`: at least one image is required (text: /api/v1/chat)"
        )
    data.refuse_compression_knobs()
    model = data.model or default_model(pipeline.settings)
    messages = [m.to_message(i) for i, m in enumerate(data.messages)]
    images = [_base64(image, f"images[{i}]") for i, image in enumerate(data.images)]
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, "`messages`: the images go with a user message; there is none"
        )
    messages[last_user] = msgspec.structs.replace(messages[last_user], images=images)
    wire = GenerateRequest(messages=messages, tools=data.tools, **data.fields(pipeline.request_id, model))
    dialect = Vision(model, wire.id, streams=data.stream, images=len(images))
    return await _serve(pipeline, wire, dialect, VLM_TIMEOUT_S)


def _base64(image: str, where: str) -> str:
    """A data URL's payload (the seed's documented form), or plain base64 as Ollama takes it."""
    return data_url_image(image, where) if image.startswith("data:") else image


async def _openai(pipeline: Pipeline, data: OpenAIBody, timeout_s: float) -> Answer:
    model = data.model or default_model(pipeline.settings)
    data.model = model
    usage = data.stream_options is not None and data.stream_options.include_usage
    wire = data.to_request(pipeline.request_id)
    dialect = OpenAI(_Shape(True, wire.id, model), streams=data.stream, include_usage=usage)
    return await _serve(pipeline, wire, dialect, timeout_s)


@shared_post("/api/v1/chat/completions", "chat (OpenAI format)")
async def chat_completions(data: JSONBody[OpenAIBody], pipeline: Piped) -> Answer:
    return await _openai(pipeline, data, TEXT_TIMEOUT_S)


@shared_post("/api/v1/vlm/openai", "vision-language chat (OpenAI format, for Docling)")
async def vlm_openai(data: JSONBody[OpenAIBody], pipeline: Piped) -> Answer:
    return await _openai(pipeline, data, VLM_TIMEOUT_S)


class SeedEmbedding(Embedding):
    def __init__(self, pipeline: Pipeline, prompt: str) -> None:
        super().__init__(pipeline.settings)
        self.prompt = prompt
        self.started = time.perf_counter()

    def answer(self, result: EmbedResponse, request_id: str) -> Response[bytes]:
        body = {
            "embedding": result.embeddings[0],
            "model": result.model,
            "prompt": self.prompt,
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 2),
        }
        return Response(_encode(body), media_type="application/json", headers={"X-Request-Id": request_id})


@shared_post("/api/v1/embeddings", "embeddings")
async def embeddings(data: JSONBody[EmbeddingsBody], pipeline: Piped) -> Response[bytes]:
    if not data.prompt.strip():
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`prompt` must not be empty")
    model = data.model or default_model(pipeline.settings)
    wire = EmbedRequest(id=pipeline.request_id, model=model, input=data.prompt)
    dialect = SeedEmbedding(pipeline, data.prompt)
    subject = subjects.embed_subject(model)
    return await pipeline.serve(  # type: ignore[return-value]
        wire, dialect, timeout_s=TEXT_TIMEOUT_S, subject=subject, origin=origin(pipeline.request)
    )


ROUTES = [generate, chat, vlm, chat_completions, vlm_openai, embeddings, *ADMIN_ROUTES]
