"""Ollama-compatible routes under `/ollama`: point `OLLAMA_HOST` at the edge and nothing else changes.

Streaming answers are NDJSON with Ollama's field names and final statistics (durations in
nanoseconds); errors are `{"error": "..."}` with the status Ollama would use. Embeddings take the
edge's one embed path; `tags`, `ps` and `show` read the janitors' inventory and admin API, as
`/v1/models` does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Stream

from contracts import (
    Completion,
    Done,
    EmbedRequest,
    EmbedResponse,
    Error,
    ErrorCode,
    Format,
    GenerateRequest,
    LlmbusError,
    Message,
    Options,
    Routed,
    Token,
)
from contracts.embed import Dimensions
from contracts.models import LoadRequest, ModelDetails, ModelInfo, ModelRef, canonical_model
from services.edge.admission import Admission
from services.edge.compat.events import Seamless
from services.edge.dispatch import Dispatcher
from services.edge.embed import Embedding, embed_with
from services.edge.errors import Failure, handlers, request_id_of
from services.edge.generation import collect
from services.edge.models import listing
from services.edge.serve import Dialect, Source, serve
from services.runtime import durations
from services.runtime.admin_client import AdminClient
from services.runtime.events import RawEvent
from services.runtime.inventory import InventoryView
from services.runtime.settings import Settings

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
    messages: list[OllamaMessage] = []  # none: Ollama's "load the model" (or unload, `keep_alive: 0`)

    @property
    def empty(self) -> bool:
        return not self.messages

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
    prompt: str = ""  # empty: Ollama's "load the model" (or unload, `keep_alive: 0`)
    system: str | None = None

    @property
    def empty(self) -> bool:
        return not self.prompt

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
    return _json({"error": failure.message}, request_id, failure.status)


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

    def final(self, done: Done | Completion, text: str = "") -> dict[str, Any]:
        out = self.piece(text)
        if isinstance(done, Completion):
            out["model"] = done.model  # the model that answered (`auto` says which)
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


class Ollama(Dialect):
    """Chat and generate: NDJSON lines with Ollama's field names, the last with its statistics."""

    media_type = "application/x-ndjson"
    error = staticmethod(ollama_error)

    def __init__(self, shape: _Shape, *, streams: bool) -> None:
        self.shape = shape
        self.streams = streams
        self.events = Seamless()

    def frame(self, batch: list[RawEvent]) -> bytes:
        shape = self.shape
        out: list[bytes] = []
        for event in self.events.events(batch):
            if isinstance(event, Token):
                out.append(_encode(shape.piece(event.text)) + b"\n")
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
        return _json(self.shape.final(result, result.text), request_id)


async def _answer(
    request: Request[Any, Any, Any], body: ChatBody | GenerateBody, chat: bool, dispatcher: Dispatcher
) -> Response[bytes] | Stream:
    wire = body.to_request(request_id_of(request))
    return await serve(request, wire, Ollama(_Shape(chat, body.model), streams=body.stream), dispatcher)


async def _load_or_unload(
    request: Request[Any, Any, Any],
    body: ChatBody | GenerateBody,
    chat: bool,
    admission: Admission,
    admin: AdminClient,
) -> Response[bytes]:
    """Ollama's idiom with nothing to answer: load the model (for `keep_alive`, default its idle
    TTL, negative: until unloaded), or unload it with `keep_alive: 0`. The janitor of the model's
    host does it, as for `POST /v1/models/load|unload`, so it takes an admin key as they do."""
    ModelRef(body.model).validate()
    try:
        keep = None if body.keep_alive is None else durations.seconds(body.keep_alive)
    except ValueError as exc:
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"keep_alive: {exc}") from None
    admission.check_model(body.model, request.user)
    if not admission.is_admin(request.user):
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
    return _json(answer, request_id_of(request))


def _json(body: Any, request_id: str, status: int = 200) -> Response[bytes]:
    return Response(
        _encode(body), status_code=status, media_type="application/json", headers={"X-Request-Id": request_id}
    )


@post("/api/chat", summary="Ollama-compatible chat", status_code=200)
async def chat(
    request: Request[Any, Any, Any],
    data: JSONBody[ChatBody],
    dispatcher: NamedDependency[Dispatcher],
    admission: NamedDependency[Admission],
    admin: NamedDependency[AdminClient],
) -> Response[bytes] | Stream:
    if data.empty:
        return await _load_or_unload(request, data, True, admission, admin)
    return await _answer(request, data, True, dispatcher)


@post("/api/generate", summary="Ollama-compatible generate", status_code=200)
async def generate(
    request: Request[Any, Any, Any],
    data: JSONBody[GenerateBody],
    dispatcher: NamedDependency[Dispatcher],
    admission: NamedDependency[Admission],
    admin: NamedDependency[AdminClient],
) -> Response[bytes] | Stream:
    if data.empty:
        return await _load_or_unload(request, data, False, admission, admin)
    return await _answer(request, data, False, dispatcher)


@get("/api/version", summary="Ollama-compatible version")
async def version() -> dict[str, str]:
    return {"version": VERSION}


@get("/", summary="Ollama's liveness answer", media_type="text/plain")
async def root() -> str:
    return "Ollama is running"


# -- embeddings: the edge's one embed path (`services/edge/embed.py`)


class EmbedBody(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str]
    truncate: bool | None = None
    dimensions: Dimensions | None = None
    options: dict[str, Any] | None = None  # accepted and ignored, as they do not change a vector
    keep_alive: str | int | float | None = None


class LegacyEmbeddingsBody(msgspec.Struct, kw_only=True):
    model: str
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


class OllamaEmbedding(Embedding):
    """`/api/embed` (`legacy`: `/api/embeddings`, one text, one vector)."""

    error = staticmethod(ollama_error)

    def __init__(self, settings: Settings, *, legacy: bool = False) -> None:
        super().__init__(settings)
        self.legacy = legacy

    def answer(self, result: EmbedResponse, request_id: str) -> Response[bytes]:
        if self.legacy:
            return _json({"embedding": result.embeddings[0]}, request_id)
        body = {
            "model": result.model,
            "embeddings": result.embeddings,
            "total_duration": int(result.timings.total_ms * 1e6),
            "load_duration": 0,
            "prompt_eval_count": result.usage.prompt_tokens,
        }
        return _json(body, request_id)


@post("/api/embed", summary="Ollama-compatible embed", status_code=200)
async def embed(
    request: Request[Any, Any, Any],
    data: JSONBody[EmbedBody],
    dispatcher: NamedDependency[Dispatcher],
    settings: NamedDependency[Settings],
) -> Response[bytes]:
    wire = EmbedRequest(
        id=request_id_of(request),
        model=data.model,
        input=data.input,
        truncate=data.truncate,
        dimensions=data.dimensions,
    )
    return await embed_with(request, wire, OllamaEmbedding(settings), dispatcher)


@post("/api/embeddings", summary="Ollama's legacy single-text embeddings", status_code=200)
async def embeddings(
    request: Request[Any, Any, Any],
    data: JSONBody[LegacyEmbeddingsBody],
    dispatcher: NamedDependency[Dispatcher],
    settings: NamedDependency[Settings],
) -> Response[bytes]:
    wire = EmbedRequest(id=request_id_of(request), model=data.model, input=data.prompt)
    return await embed_with(request, wire, OllamaEmbedding(settings, legacy=True), dispatcher)


# -- models: the janitors' inventory and admin API, as `/v1/models` serves them (services/edge/models.py)


@get("/api/tags", summary="Ollama-compatible list of local models")
async def tags(request: Request[Any, Any, Any], inventory: NamedDependency[InventoryView]) -> Response[bytes]:
    found = listing(inventory, None, loaded_only=False).data
    entries = [_entry(info) for model in found if (info := _first(model.hosts, ready=True))]
    return _json({"models": entries}, request_id_of(request))


@get("/api/ps", summary="Ollama-compatible list of loaded models")
async def ps(request: Request[Any, Any, Any], inventory: NamedDependency[InventoryView]) -> Response[bytes]:
    found = listing(inventory, None, loaded_only=True).data
    entries = []
    for model in found:
        info = model.hosts[0]
        entry = _entry(info) | {"size_vram": info.size_vram}
        if info.expires_at is not None:
            entry["expires_at"] = _iso(info.expires_at)
        entries.append(entry)
    return _json({"models": entries}, request_id_of(request))


class ShowBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # the field's old name, still sent by older clients
    verbose: bool | None = None


@post("/api/show", summary="Ollama-compatible model details", status_code=200)
async def show(
    request: Request[Any, Any, Any],
    data: JSONBody[ShowBody],
    inventory: NamedDependency[InventoryView],
    admin: NamedDependency[AdminClient],
) -> Response[bytes]:
    name = data.model or data.name
    if not name:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "model is required")
    ModelRef(name).validate()
    hosts = sorted(info.host for info in inventory.lookup(name) if info.ready)
    if not hosts and inventory.populated:
        raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model '{name}' not found")
    host = hosts[0] if hosts else admin.host_for(None, name)  # no inventory yet: ask the janitor
    shown = await admin.call("show", ModelRef(name), ModelDetails, host)
    body: dict[str, Any] = {
        "license": "",
        "modelfile": shown.modelfile,
        "parameters": shown.parameters,
        "template": shown.template,
        "system": shown.system,
        "details": shown.details,
        "model_info": shown.model_info,
        "capabilities": shown.capabilities,
    }
    if shown.info is not None:
        body["modified_at"] = _iso(shown.info.updated_at)
    return _json(body, request_id_of(request))


def _first(infos: list[ModelInfo], *, ready: bool) -> ModelInfo | None:
    return next((info for info in infos if info.ready or not ready), None)


def _entry(info: ModelInfo) -> dict[str, Any]:
    """One model as `/api/tags` and `/api/ps` list it, from its inventory entry."""
    name = canonical_model(info.model)
    return {
        "name": name,
        "model": name,
        "modified_at": _iso(info.updated_at),
        "size": info.size,
        "digest": info.digest or "",
        "details": {
            "parent_model": "",
            "format": "gguf",  # every model Ollama serves
            "family": info.family or "",
            "families": [info.family] if info.family else None,
            "parameter_size": info.parameter_size or "",
            "quantization_level": info.quantization or "",
        },
    }


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


router = Router(
    path="/ollama",
    route_handlers=[chat, generate, embed, embeddings, tags, ps, show, version, root],
    tags=["Ollama-compatible"],
    exception_handlers=handlers(ollama_error),  # type: ignore[arg-type]
)
