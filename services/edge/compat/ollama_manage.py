"""Ollama's model management under `/ollama/api`: `pull`, `create`, `copy` and `delete`.

The janitor of the model's host does them through its admin API (`llm.admin.<verb>`), as for
`/v1/models/*`, so they need an admin key as those do (`opt={"admin": True}`, services/edge/auth.py).
Progress is Ollama's NDJSON (`{"status", "digest", "total", "completed"}` per layer, as the host
sent it, then `{"status": "success"}`), or one `{"status": "success"}` with `"stream": false`; a
failure after the stream began is Ollama's in-band `{"error": "..."}` line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import HttpMethod, Request, Response, delete, post, route
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from contracts import ErrorCode, LlmbusError
from contracts.models import (
    CopyRequest,
    ModelEvent,
    ModelInfo,
    ModelRef,
    OpAccepted,
    OpDone,
    OpError,
    StatusLine,
)
from services.edge.compat.ollama_models import json_answer
from services.edge.errors import request_id_of
from services.edge.models import ADMIN_ONLY
from services.runtime.admin_client import AdminClient

_encode = msgspec.json.Encoder().encode
Admin = NamedDependency[AdminClient]
_SUCCESS = b'{"status":"success"}'


class PullBody(msgspec.Struct, kw_only=True):
    """Ollama's `PullRequest`."""

    model: str = ""
    name: str = ""  # the field's old name
    insecure: bool = False
    stream: bool = True
    username: str = ""  # deprecated in Ollama
    password: str = ""  # deprecated in Ollama

    def refuse(self) -> None:
        if self.insecure:
            _unsupported("insecure", "the janitor pulls from registries over verified TLS only")
        for field in ("username", "password"):
            if getattr(self, field):
                _unsupported(field, "registry credentials are the model host's configuration")


class CreateBody(msgspec.Struct, kw_only=True):
    """Ollama's `CreateRequest` (0.5.5 and later), and the older one with a `modelfile` string."""

    model: str = ""
    name: str = ""  # the field's old name
    stream: bool = True
    quantize: str = ""
    quantization: str = ""  # the field's old name
    from_: str = msgspec.field(default="", name="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    license: str | list[str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    modelfile: str = ""  # before 0.5.5: the Modelfile's text
    path: str = ""  # before 0.5.5: a Modelfile on the server's disk

    def to_request(self) -> dict[str, Any]:
        if self.path:
            _unsupported("path", "send the Modelfile's text as `modelfile`, or the structured fields")
        out: dict[str, Any] = msgspec.to_builtins(self)
        for edge_only in ("name", "stream", "quantization", "path"):
            out.pop(edge_only, None)
        out["model"] = _name(self.model, self.name)
        out["quantize"] = self.quantize or self.quantization
        return {k: v for k, v in out.items() if v not in ("", None)}


class CopyBody(msgspec.Struct, kw_only=True):
    source: str = ""
    destination: str = ""


class DeleteBody(msgspec.Struct, kw_only=True):
    model: str = ""
    name: str = ""  # the field's old name


def _unsupported(field: str, why: str) -> None:
    raise LlmbusError(ErrorCode.UNSUPPORTED, f"`{field}` is not supported: {why}")


def _name(model: str, old: str) -> str:
    name = model or old
    if not name:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "model is required")
    ModelRef(name).validate()
    return name


@post("/api/pull", summary="Ollama-compatible pull (a janitor pulls it)", status_code=200, opt=ADMIN_ONLY)
async def pull(
    request: Request[Any, Any, Any], data: JSONBody[PullBody], admin: Admin
) -> Response[bytes] | Stream:
    data.refuse()
    model = _name(data.model, data.name)
    return await _operate(request, admin, "pull", {"model": model}, data.stream)


@post(
    "/api/create", summary="Ollama-compatible create (a janitor creates it)", status_code=200, opt=ADMIN_ONLY
)
async def create(
    request: Request[Any, Any, Any], data: JSONBody[CreateBody], admin: Admin
) -> Response[bytes] | Stream:
    return await _operate(request, admin, "create", data.to_request(), data.stream)


@post("/api/copy", summary="Ollama-compatible copy", status_code=200, opt=ADMIN_ONLY)
async def copy(request: Request[Any, Any, Any], data: JSONBody[CopyBody], admin: Admin) -> Response[bytes]:
    req = CopyRequest(source=_name(data.source, ""), destination=_name(data.destination, ""))
    await admin.call("copy", req, ModelInfo, admin.host_for(None, req.source))
    return _empty(request)


@delete("/api/delete", summary="Ollama-compatible delete", status_code=200, opt=ADMIN_ONLY)
async def delete_model(
    request: Request[Any, Any, Any], data: JSONBody[DeleteBody], admin: Admin
) -> Response[bytes]:
    model = _name(data.model, data.name)
    await admin.call("delete", ModelRef(model), OpAccepted, admin.host_for(None, model))
    return _empty(request)


def _empty(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Ollama answers copy and delete with 200 and no body."""
    return Response(b"", status_code=200, headers={"X-Request-Id": request_id_of(request)})


async def _operate(
    request: Request[Any, Any, Any], admin: AdminClient, verb: str, body: dict[str, Any], stream: bool
) -> Response[bytes] | Stream:
    host = admin.host_for(None, body["model"], where_it_is=False)
    events = await admin.operate(verb, body, host)  # a refusal raises here: a plain HTTP error
    request_id = request_id_of(request)
    if stream:
        headers = {"X-Request-Id": request_id}
        return Stream(_lines(events), media_type="application/x-ndjson", headers=headers)
    async for event in events:  # a client that hangs up leaves the pull running, as Ollama's does
        if isinstance(event, OpError):
            raise LlmbusError(event.code, event.message)
    return json_answer({"status": "success"}, request_id)


async def _lines(events: AsyncIterator[ModelEvent]) -> AsyncIterator[bytes]:
    succeeded = False
    try:
        async for event in events:
            if isinstance(event, OpDone):
                if not succeeded:
                    yield _SUCCESS + b"\n"
            elif isinstance(event, OpError):
                yield _encode({"error": event.message}) + b"\n"
            else:
                step = event.progress
                line = event.line or StatusLine(step.status, total=step.total, completed=step.completed)
                succeeded = line.status == "success"
                yield _encode(line) + b"\n"
    except LlmbusError as exc:  # the janitor went silent
        yield _encode({"error": exc.message}) + b"\n"


@route(
    "/api/blobs/{digest:str}", http_method=[HttpMethod.POST, HttpMethod.HEAD], summary="Ollama's blob upload"
)
async def blobs(digest: FromPath[str]) -> None:
    """Refused without reading the upload: the edge relays no model files over the bus."""
    _unsupported(
        "blobs",
        "llmbus does not relay model files; upload to the model host's own /api/blobs, "
        "then give the digest in `files`",
    )


MANAGE_ROUTES = [pull, create, copy, delete_model, blobs]
