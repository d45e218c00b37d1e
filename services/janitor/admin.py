"""The admin API: a NATS micro service (`llmbus-janitor`, discovery and stats via `$SRV.*`).

Every verb answers on `llm.admin.<verb>` (any janitor; fine with one host) and on
`llm.admin.<host>.<verb>` (this janitor). Replies are JSON structs from `contracts.models`; a
failure is a micro-service error (`Nats-Service-Error-Code` = the HTTP status) whose payload is an
`ErrorBody` with the stable code.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.micro
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import Service

from contracts import ErrorCode, LlmbusError, subjects
from contracts.models import (
    ADMIN_VERBS,
    CopyRequest,
    CreateRequest,
    LoadRequest,
    ModelDetails,
    ModelList,
    ModelRef,
    OpAccepted,
    PullRequest,
    canonical_model,
)
from services.janitor import modelfile
from services.janitor.janitor import Janitor
from services.runtime.backends.ollama_admin import CreateSpec
from services.runtime.micro import respond_error

log = logging.getLogger("llmbus.janitor")

_encode = msgspec.json.Encoder().encode

Verb = Callable[[bytes], Awaitable[msgspec.Struct]]


def _decode(data: bytes, kind: Any) -> Any:
    try:
        request = msgspec.json.decode(data or b"{}", type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"malformed admin request: {exc}") from None
    request.validate()
    return request


class Admin:
    def __init__(self, janitor: Janitor) -> None:
        self.janitor = janitor
        self.host = janitor.host

    async def list(self, data: bytes) -> ModelList:
        return ModelList(host=self.host, models=await self.janitor.sync())

    async def ps(self, data: bytes) -> ModelList:
        return ModelList(host=self.host, models=[m for m in await self.janitor.sync() if m.loaded])

    async def show(self, data: bytes) -> ModelDetails:
        ref: ModelRef = _decode(data, ModelRef)
        raw = await self.janitor.admin.show(ref.model)
        info = self.janitor.entry(canonical_model(ref.model))
        return ModelDetails(
            host=self.host,
            model=ref.model,
            modelfile=str(raw.get("modelfile", "")),
            parameters=str(raw.get("parameters", "")),
            template=str(raw.get("template", "")),
            system=str(raw.get("system", "")),
            capabilities=list(raw.get("capabilities") or []),
            details=dict(raw.get("details") or {}),
            model_info=dict(raw.get("model_info") or {}),
            modified_at=str(raw.get("modified_at") or ""),
            info=info,
        )

    async def pull(self, data: bytes) -> OpAccepted:
        req: PullRequest = _decode(data, PullRequest)
        operation = self.janitor.start_pull(req.model, req.progress)
        return OpAccepted(host=self.host, model=operation.model, op="pull")

    async def create(self, data: bytes) -> OpAccepted:
        req: CreateRequest = _decode(data, CreateRequest)
        spec = modelfile.parse(req.modelfile) if req.modelfile else _structured(req)
        if req.quantize:
            spec.quantize = req.quantize
        # The text the created model's digest is of: the Modelfile, or the structured request.
        text = req.modelfile or _encode(msgspec.structs.replace(req, progress=None)).decode()
        operation = self.janitor.start_create(req.model, text, progress=req.progress, spec=spec)
        return OpAccepted(host=self.host, model=operation.model, op="create")

    async def copy(self, data: bytes) -> msgspec.Struct:
        req: CopyRequest = _decode(data, CopyRequest)
        return await self.janitor.copy(req.source, req.destination)

    async def delete(self, data: bytes) -> OpAccepted:
        ref: ModelRef = _decode(data, ModelRef)
        await self.janitor.delete(ref.model)
        return OpAccepted(host=self.host, model=canonical_model(ref.model), op="delete")

    async def load(self, data: bytes) -> msgspec.Struct:
        req: LoadRequest = _decode(data, LoadRequest)
        return await self.janitor.load(req.model, req.keep_alive_s)

    async def unload(self, data: bytes) -> msgspec.Struct:
        ref: ModelRef = _decode(data, ModelRef)
        return await self.janitor.unload(ref.model)


def _structured(req: CreateRequest) -> CreateSpec:
    """Ollama's structured create request as the spec its `/api/create` takes (blobs by digest)."""
    return CreateSpec(
        from_=req.from_,
        files=req.files,
        adapters=req.adapters,
        template=req.template,
        system=req.system,
        license=req.license,
        parameters=req.parameters,
        messages=req.messages,
    )


def _endpoint(verb: str, call: Verb) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        try:
            result = await call(request.data)
        except LlmbusError as exc:
            await respond_error(request, exc.code, exc.message)
            return
        except Exception as exc:
            log.error("admin %s failed", verb, exc_info=exc)
            await respond_error(request, ErrorCode.INTERNAL, f"internal error in the janitor's {verb}")
            return
        await request.respond(_encode(result))

    return handle


async def serve(nc: Client, janitor: Janitor) -> Service:
    admin = Admin(janitor)
    service = await nats.micro.add_service(
        nc,
        name="llmbus-janitor",
        version="0.1.0",
        description=f"llmbus model janitor for host {janitor.host}",
        metadata={"host": janitor.host, "backend": janitor.admin.kind, "url": janitor.admin.url},
    )
    for verb in ADMIN_VERBS:
        handler = _endpoint(verb, getattr(admin, verb))
        await service.add_endpoint(name=verb, subject=subjects.admin_subject(verb), handler=handler)
        await service.add_endpoint(
            name=verb, subject=subjects.admin_subject(verb, janitor.host), handler=handler
        )
    return service
