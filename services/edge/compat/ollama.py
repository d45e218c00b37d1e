"""Ollama-compatible routes under `/ollama`: point `OLLAMA_HOST` at the edge and nothing else changes.

Streaming answers are NDJSON with Ollama's field names and final statistics (durations in
nanoseconds); errors are `{"error": "..."}` with the status Ollama would use. Embeddings take the
edge's one embed path; `tags`, `ps` and `show` read the janitors' inventory and admin API, as
`/v1/models` does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from contracts import Completion, Done, Error, ErrorCode, LlmbusError, Routed, Token
from contracts.embed import EmbedResponse
from contracts.messages import Thinking, ToolCallEvent
from contracts.models import LoadRequest, ModelInfo, ModelRef
from contracts.tools import Logprob, ToolCall
from services.edge.admission import Admission
from services.edge.compat.events import Seamless
from services.edge.compat.ollama_bodies import ChatBody, EmbedBody, GenerateBody, LegacyEmbeddingsBody
from services.edge.compat.ollama_manage import MANAGE_ROUTES
from services.edge.compat.ollama_models import MODEL_ROUTES, json_answer
from services.edge.embed import Embedding, embed_with
from services.edge.errors import Failure, handlers, request_id_of
from services.edge.generation import collect
from services.edge.serve import Answer, Dialect, Piped, Pipeline, Source
from services.edge.tenants import Tenant
from services.runtime import durations
from services.runtime.admin_client import AdminClient
from services.runtime.events import RawEvent
from services.runtime.settings import Settings

VERSION = "0.12.0"  # the Ollama API version whose shapes these routes follow

_encode = msgspec.json.Encoder().encode
Admin = NamedDependency[AdminClient]


def ollama_error(failure: Failure, request_id: str) -> Response[bytes]:
    return json_answer({"error": failure.message}, request_id, failure.status)


class _Shape:
    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model

    def piece(
        self,
        text: str,
        thinking: str | None = None,
        calls: list[ToolCall] | None = None,
        logprobs: list[Logprob] | None = None,
    ) -> dict[str, Any]:
        """A line: answer text, or thinking (chat: in `message`, generate: top-level), or calls."""
        out: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = [_call(call, i) for i, call in enumerate(calls)]
            out["message"] = message
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        out["done"] = False
        if logprobs is not None:
            out["logprobs"] = [msgspec.to_builtins(lp) for lp in logprobs]
        return out

    def final(self, done: Done | Completion, text: str = "") -> dict[str, Any]:
        if isinstance(done, Completion):
            out = self.piece(text, done.thinking, done.tool_calls, done.logprobs)
            out["model"] = done.model  # the model that answered (`auto` says which)
        else:
            out = self.piece(text)
        total_ns = int(done.timings.total_ms * 1e6)
        speed = done.timings.tokens_per_s
        eval_ns = int(done.usage.completion_tokens / speed * 1e9) if speed else total_ns
        first_ns = int((done.timings.ttft_ms or 0) * 1e6)
        out.update(
            done=True,
            done_reason="stop" if done.finish_reason == "tool_calls" else done.finish_reason,
            total_duration=total_ns,
            load_duration=0,
            prompt_eval_count=done.usage.prompt_tokens,
            prompt_eval_duration=first_ns,
            eval_count=done.usage.completion_tokens,
            eval_duration=eval_ns,
        )
        return out


def _call(call: ToolCall, index: int) -> dict[str, Any]:
    """Ollama's call: arguments as an object, its place in the answer as `function.index`."""
    function = {"index": index, "name": call.function.name, "arguments": call.function.arguments}
    return {"id": call.id, "function": function}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Ollama(Dialect):
    """Chat and generate: NDJSON lines with Ollama's field names, the last with its statistics."""

    media_type = "application/x-ndjson"
    error = staticmethod(ollama_error)
    status_waits = True

    def __init__(self, shape: _Shape, *, streams: bool) -> None:
        self.shape = shape
        self.streams = streams
        self.events = Seamless()

    def frame(self, batch: list[RawEvent]) -> bytes:
        shape = self.shape
        out: list[bytes] = []
        for event in self.events.events(batch):
            if isinstance(event, Token):
                out.append(_encode(shape.piece(event.text, logprobs=event.logprobs)) + b"\n")
            elif isinstance(event, Thinking):
                out.append(_encode(shape.piece("", thinking=event.text)) + b"\n")
            elif isinstance(event, ToolCallEvent):  # each call in a line of its own, as Ollama streams
                line = shape.piece("")
                line["message"]["tool_calls"] = [_call(event.call, event.index)]
                out.append(_encode(line) + b"\n")
            elif isinstance(event, Routed):
                shape.model = event.model  # lines name the model that answers, as non-streamed ones do
            elif isinstance(event, Done):
                out.append(_encode(shape.final(event)) + b"\n")
            else:
                out.append(_encode({"error": event.message}) + b"\n")  # Ollama's in-stream error line
        self.ended = self.events.ended
        return b"".join(out)

    async def collect(self, source: Source) -> Completion | Error:
        return await collect(source, self.shape.model)

    def answer(self, result: Completion, request_id: str) -> Response[bytes]:
        return json_answer(self.shape.final(result, result.text), request_id)


async def _answer(
    pipeline: Pipeline, body: ChatBody | GenerateBody, chat: bool, admin: AdminClient
) -> Answer:
    if body.empty:
        return await _load_or_unload(pipeline.request, body, chat, admin)
    wire = body.to_request(pipeline.request_id)
    return await pipeline.serve(wire, Ollama(_Shape(chat, body.model), streams=body.stream))


async def _load_or_unload(
    request: Request[Any, Any, Any], body: ChatBody | GenerateBody, chat: bool, admin: AdminClient
) -> Response[bytes]:
    """Ollama's idiom with nothing to answer: load the model (for `keep_alive`, default its idle
    TTL, negative: until unloaded), or unload it with `keep_alive: 0`. The janitor of the model's
    host does it, as for `POST /v1/models/load|unload`, so it takes an admin key as they do."""
    ModelRef(body.model).validate()
    try:
        keep = None if body.keep_alive is None else durations.seconds(body.keep_alive)
    except ValueError as exc:
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"keep_alive: {exc}") from None
    tenant: Tenant = request.user
    Admission.check_model(body.model, tenant)
    if not tenant.admin:  # an admin key (every caller is admin with auth off)
        raise LlmbusError(ErrorCode.FORBIDDEN, "loading or unloading a model needs an admin key")
    host = admin.host_for(None, body.model)
    if keep == 0:
        await admin.call("unload", ModelRef(body.model), ModelInfo, host)
    else:
        forever = keep is not None and keep < 0
        await admin.call("load", LoadRequest(body.model, -1 if forever else keep), ModelInfo, host)
    answer: dict[str, Any] = {"model": body.model, "created_at": _now()}
    if chat:
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    answer |= {"done": True, "done_reason": "unload" if keep == 0 else "load"}
    return json_answer(answer, request_id_of(request))


@post("/api/chat", summary="Ollama-compatible chat", status_code=200)
async def chat(data: JSONBody[ChatBody], pipeline: Piped, admin: Admin) -> Answer:
    return await _answer(pipeline, data, True, admin)


@post("/api/generate", summary="Ollama-compatible generate", status_code=200)
async def generate(data: JSONBody[GenerateBody], pipeline: Piped, admin: Admin) -> Answer:
    return await _answer(pipeline, data, False, admin)


@get("/api/version", summary="Ollama-compatible version")
async def version() -> dict[str, str]:
    return {"version": VERSION}


@get("/", summary="Ollama's liveness answer", media_type="text/plain")
async def root() -> str:
    return "Ollama is running"


# -- embeddings: the edge's one embed path (`services/edge/embed.py`)


class OllamaEmbedding(Embedding):
    """`/api/embed` (`legacy`: `/api/embeddings`, one text, one vector)."""

    error = staticmethod(ollama_error)
    status_waits = True

    def __init__(self, settings: Settings, *, legacy: bool = False) -> None:
        super().__init__(settings)
        self.legacy = legacy

    def answer(self, result: EmbedResponse, request_id: str) -> Response[bytes]:
        if self.legacy:
            return json_answer({"embedding": result.embeddings[0]}, request_id)
        body = {
            "model": result.model,
            "embeddings": result.embeddings,
            "total_duration": int(result.timings.total_ms * 1e6),
            "load_duration": 0,
            "prompt_eval_count": result.usage.prompt_tokens,
        }
        return json_answer(body, request_id)


@post("/api/embed", summary="Ollama-compatible embed", status_code=200)
async def embed(data: JSONBody[EmbedBody], pipeline: Piped) -> Response[bytes]:
    wire = data.to_request(pipeline.request_id)
    return await embed_with(pipeline, wire, OllamaEmbedding(pipeline.settings))


@post("/api/embeddings", summary="Ollama's legacy single-text embeddings", status_code=200)
async def embeddings(data: JSONBody[LegacyEmbeddingsBody], pipeline: Piped) -> Response[bytes]:
    wire = data.to_request(pipeline.request_id)
    return await embed_with(pipeline, wire, OllamaEmbedding(pipeline.settings, legacy=True))


router = Router(
    path="/ollama",
    route_handlers=[chat, generate, embed, embeddings, *MODEL_ROUTES, *MANAGE_ROUTES, version, root],
    tags=["Ollama-compatible"],
    exception_handlers=handlers(ollama_error),  # type: ignore[arg-type]
)
