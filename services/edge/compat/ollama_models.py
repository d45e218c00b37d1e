"""Ollama's model routes under `/ollama`: `tags`, `ps` and `show` read the janitors' inventory and
admin API, as `/v1/models` does (services/edge/models.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from contracts import ErrorCode, LlmbusError
from contracts.models import ModelDetails, ModelInfo, ModelRef, canonical_model
from services.edge.errors import request_id_of
from services.edge.models import listing
from services.runtime.admin_client import AdminClient
from services.runtime.inventory import InventoryView

_encode = msgspec.json.Encoder().encode
Admin = NamedDependency[AdminClient]
Inventory = NamedDependency[InventoryView]


def json_answer(body: Any, request_id: str, status: int = 200) -> Response[bytes]:
    return Response(
        _encode(body), status_code=status, media_type="application/json", headers={"X-Request-Id": request_id}
    )


@get("/api/tags", summary="Ollama-compatible list of local models")
async def tags(request: Request[Any, Any, Any], inventory: Inventory) -> Response[bytes]:
    found = listing(inventory, None, loaded_only=False).data
    entries = [_entry(info) for model in found if (info := _first(model.hosts, ready=True))]
    return json_answer({"models": entries}, request_id_of(request))


@get("/api/ps", summary="Ollama-compatible list of loaded models")
async def ps(request: Request[Any, Any, Any], inventory: Inventory) -> Response[bytes]:
    return json_answer({"models": loaded(inventory)}, request_id_of(request))


def loaded(inventory: InventoryView) -> list[dict[str, Any]]:
    """The loaded models as `/api/ps` lists them (also seed 003's `/api/v1/models/ps`)."""
    entries = []
    for model in listing(inventory, None, loaded_only=True).data:
        info = model.hosts[0]
        entry = _entry(info) | {"size_vram": info.size_vram}
        if info.expires_at is not None:
            entry["expires_at"] = _iso(info.expires_at)
        entries.append(entry)
    return entries


class ShowBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # the field's old name, still sent by older clients
    verbose: bool | None = None


@post("/api/show", summary="Ollama-compatible model details", status_code=200)
async def show(
    request: Request[Any, Any, Any], data: JSONBody[ShowBody], inventory: Inventory, admin: Admin
) -> Response[bytes]:
    name = data.model or data.name
    if not name:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "model is required")
    return json_answer(await details(name, inventory, admin), request_id_of(request))


async def details(name: str, inventory: InventoryView, admin: AdminClient) -> dict[str, Any]:
    """A model's `/api/show` body, from the janitor of a host that has it (also seed 003's)."""
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
    if shown.modified_at:  # the host's own time of the model's last change
        body["modified_at"] = shown.modified_at
    elif shown.info is not None:  # a host that does not say: when the inventory last saw it change
        body["modified_at"] = _iso(shown.info.updated_at)
    return body


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


MODEL_ROUTES = [tags, ps, show]
