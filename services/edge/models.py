"""`/v1/models`: the model inventory (from the KV bucket) and the janitor's admin API over HTTP.

`GET /v1/models` has OpenAI's list shape (`{"object": "list", "data": [{"id", "object", ...}]}`),
so OpenAI SDKs can list models too; each entry adds where the model is and in what state. The
admin routes forward to the janitor of the right host over NATS; pull and create stream their
progress as SSE when asked (`"stream": true` or `Accept: text/event-stream`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import Stream
from nats.aio.client import Client

from contracts import EventHead, LlmbusError, canonical_model
from contracts.models import (
    CopyRequest,
    LoadRequest,
    ModelDetails,
    ModelEvent,
    ModelInfo,
    ModelRef,
    Op,
    OpAccepted,
    OpDone,
    OpError,
    validate_host,
)
from services.edge.errors import request_id_of
from services.edge.serve import SSE_HEADERS
from services.edge.sse import frame
from services.runtime.admin_client import AdminClient
from services.runtime.inventory import InventoryView

_encode = msgspec.json.Encoder().encode

Admin = NamedDependency[AdminClient]
Inventory = NamedDependency[InventoryView]
Answer = Response[bytes] | Stream

ADMIN_ONLY = {"admin": True}  # changing a host's models needs an admin key (services/edge/auth.py)


def _admin_post(path: str, summary: str) -> post:
    return post(path, summary=summary, status_code=200, opt=ADMIN_ONLY)


class ModelEntry(msgspec.Struct, kw_only=True):
    """One model (OpenAI's `model` object) and its state on every host that has it."""

    id: str
    object: Literal["model"] = "model"
    created: int  # Unix seconds of the newest change on any host
    owned_by: str = "llmbus"
    ready: bool  # some host can serve it now
    loaded: bool  # some host has it in memory
    hosts: list[ModelInfo]


class ModelListing(msgspec.Struct):
    data: list[ModelEntry]
    object: Literal["list"] = "list"


class PullBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    host: str | None = None
    stream: bool = False


class CreateBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    modelfile: str  # the Modelfile's text
    host: str | None = None
    stream: bool = False


class CopyBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    source: str
    destination: str
    host: str | None = None


class LoadBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    host: str | None = None
    keep_alive_s: float | None = None  # -1: until unloaded; default: the model's idle TTL


class UnloadBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    host: str | None = None


def listing(inventory: InventoryView, host: str | None, loaded_only: bool) -> ModelListing:
    if host:
        validate_host(host)
    by_model: dict[str, list[ModelInfo]] = {}
    for info in inventory.entries.values():
        if (host and info.host != host) or (loaded_only and not info.loaded):
            continue
        by_model.setdefault(canonical_model(info.model), []).append(info)
    return ModelListing(data=[_entry(name, infos) for name, infos in sorted(by_model.items())])


def model_entry(inventory: InventoryView, name: str) -> ModelEntry | None:
    """One model as the listing shows it (OpenAI's `models.retrieve`), None when no host has it."""
    infos = inventory.lookup(name)
    return _entry(canonical_model(name), infos) if infos else None


def _entry(name: str, infos: list[ModelInfo]) -> ModelEntry:
    return ModelEntry(
        id=name,
        created=int(max(i.updated_at for i in infos)),
        ready=any(i.ready for i in infos),
        loaded=any(i.loaded for i in infos),
        hosts=sorted(infos, key=lambda i: i.host),
    )


@get(["/v1/models", "/openai/v1/models"], summary="Every model on every host (the janitors' inventory)")
async def list_models(inventory: Inventory, host: FromQuery[str | None] = None) -> ModelListing:
    return listing(inventory, host, loaded_only=False)


@get("/v1/models/ps", summary="The models loaded in memory now")
async def running_models(inventory: Inventory, host: FromQuery[str | None] = None) -> ModelListing:
    return listing(inventory, host, loaded_only=True)


@get("/v1/models/{name:path}", summary="A model's details (Modelfile, parameters, template, state)")
async def show_model(admin: Admin, name: FromPath[str], host: FromQuery[str | None] = None) -> ModelDetails:
    model = _model(name)
    return await admin.call("show", ModelRef(model), ModelDetails, admin.host_for(host, model))


@delete("/v1/models/{name:path}", summary="Delete a model from its host", status_code=200, opt=ADMIN_ONLY)
async def delete_model(admin: Admin, name: FromPath[str], host: FromQuery[str | None] = None) -> OpAccepted:
    model = _model(name)
    return await admin.call("delete", ModelRef(model), OpAccepted, admin.host_for(host, model))


@_admin_post("/v1/models/pull", "Pull a model onto a host (progress as SSE)")
async def pull_model(request: Request[Any, Any, Any], data: JSONBody[PullBody], admin: Admin) -> Answer:
    return await _operation(request, admin, "pull", data, {"model": _model(data.model)})


@_admin_post("/v1/models/create", "Create a model from a Modelfile (progress as SSE)")
async def create_model(request: Request[Any, Any, Any], data: JSONBody[CreateBody], admin: Admin) -> Answer:
    return await _operation(
        request, admin, "create", data, {"model": _model(data.model), "modelfile": data.modelfile}
    )


@_admin_post("/v1/models/copy", "Copy a model under a new name, on its host")
async def copy_model(data: JSONBody[CopyBody], admin: Admin) -> ModelInfo:
    req = CopyRequest(source=data.source, destination=data.destination)
    req.validate()
    return await admin.call("copy", req, ModelInfo, admin.host_for(data.host, data.source))


@post("/v1/models/load", summary="Load a model into memory now", status_code=200, opt=ADMIN_ONLY)
async def load_model(data: JSONBody[LoadBody], admin: Admin) -> ModelInfo:
    req = LoadRequest(model=_model(data.model), keep_alive_s=data.keep_alive_s)
    return await admin.call("load", req, ModelInfo, admin.host_for(data.host, data.model))


@post("/v1/models/unload", summary="Unload a model from memory now", status_code=200, opt=ADMIN_ONLY)
async def unload_model(data: JSONBody[UnloadBody], admin: Admin) -> ModelInfo:
    model = _model(data.model)
    return await admin.call("unload", ModelRef(model), ModelInfo, admin.host_for(data.host, model))


def _model(name: str) -> str:
    name = name.lstrip("/")  # a `path` parameter keeps its leading slash
    ModelRef(name).validate()
    return name


async def _operation(
    request: Request[Any, Any, Any],
    admin: AdminClient,
    verb: str,
    data: PullBody | CreateBody,
    body: dict[str, Any],
) -> Answer:
    """A pull or create on the model's host (or the one asked for), streamed as SSE if asked."""
    host = admin.host_for(data.host, data.model, where_it_is=False)
    events = await admin.operate(verb, body, host)  # a refusal raises here: a plain HTTP error
    request_id = request_id_of(request)
    if data.stream or "text/event-stream" in request.headers.get("accept", ""):
        return Stream(
            _sse(events, verb, body["model"]),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, "X-Request-Id": request_id},
        )
    # Without SSE, answer when it ends; a client that hangs up leaves the pull running.
    last: ModelEvent | None = None
    async for event in events:
        last = event
    if isinstance(last, OpError):
        raise LlmbusError(last.code, last.message)  # rendered (and counted) as every failure is
    assert isinstance(last, OpDone)  # the events end with done or error
    return Response(_encode(last), media_type="application/json", headers={"X-Request-Id": request_id})


async def _sse(events: AsyncIterator[ModelEvent], verb: str, model: str) -> AsyncIterator[bytes]:
    seq = 0
    try:
        async for event in events:
            yield frame([(EventHead(type=str(event.__struct_config__.tag), seq=seq), _encode(event))])
            seq += 1
    except LlmbusError as exc:  # the janitor went silent
        op: Op = "create" if verb == "create" else "pull"
        error = OpError(host="", model=model, op=op, code=exc.code, message=exc.message)
        yield frame([(EventHead(type="error", seq=seq), _encode(error))])


# Registered by the edge's app (services/edge/app.py); the static paths come before `{name:path}`.
ROUTES = [
    list_models,
    running_models,
    pull_model,
    create_model,
    copy_model,
    load_model,
    unload_model,
    show_model,
    delete_model,
]


async def start(nc: Client) -> tuple[InventoryView, AdminClient]:
    """The inventory view (a KV watch) and the admin client."""
    inventory = await InventoryView().start(nc.jetstream())
    return inventory, AdminClient(nc, inventory)
