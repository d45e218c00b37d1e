"""OpenAI's Files and Batch API under `/openai/v1`: upload a JSONL of requests, run it as a batch,
download the answers. The edge only keeps records (services/runtime/batch_store.py); `llmbus
batcher` runs the batches (services/batcher/). docs/batches.md describes it.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, FromQuery, JSONBody
from nats.aio.client import Client

from contracts import ErrorCode, LlmbusError
from contracts.batches import ACTIVE, ENDPOINTS, Batch, ExpiresAfter, public
from services.batcher.lines import count
from services.edge.auth import tenant_of
from services.edge.compat.openai import openai_error
from services.edge.errors import handlers
from services.runtime.batch_store import BatchStore, new_id
from services.runtime.settings import Settings

_encode = msgspec.json.Encoder().encode
COMPLETION_WINDOW_S = {"24h": 24 * 3600}
MULTIPART_ROOM = 64 * 1024  # the form's own bytes around the file


class CreateBatchBody(msgspec.Struct, kw_only=True):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None


async def store_of(
    request: Request[Any, Any, Any], nc: NamedDependency[Client], settings: NamedDependency[Settings]
) -> BatchStore:
    """Opened on first use, so an edge that never sees a batch never creates its buckets (two
    requests opening it at once both succeed: creating a bucket or stream is idempotent)."""
    state = request.app.state
    if getattr(state, "batch_store", None) is None:
        state.batch_store = await BatchStore.open(nc.jetstream(), settings)
    store: BatchStore = state.batch_store
    return store


Store = NamedDependency[BatchStore]


def _json(obj: Any, status: int = 200) -> Response[bytes]:
    return Response(_encode(obj), status_code=status, media_type="application/json")


def _tenant(request: Request[Any, Any, Any]) -> str:
    """Who owns the files and batches: the caller's tenant (services/edge/auth.py)."""
    return tenant_of(request).name


async def upload_file(
    request: Request[Any, Any, Any], store: Store, settings: NamedDependency[Settings]
) -> Response[bytes]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, "upload the file as multipart/form-data with `purpose=batch` and `file`"
        )
    form = await request.form()
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose != "batch":
        raise LlmbusError(ErrorCode.BAD_REQUEST, "only `purpose=batch` files are accepted")
    if not isinstance(upload, UploadFile):
        raise LlmbusError(ErrorCode.BAD_REQUEST, "a multipart `file` field is required")
    data = await upload.read()
    if len(data) > settings.batch_max_file_bytes:
        raise LlmbusError(
            ErrorCode.REQUEST_TOO_LARGE,
            f"a batch file may have at most {settings.batch_max_file_bytes} bytes",
        )
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "a batch file must be UTF-8 JSONL") from exc
    lines = count(data)
    if lines == 0:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "the file has no lines")
    if lines > settings.batch_max_lines:
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, f"a batch file may have at most {settings.batch_max_lines} lines"
        )
    expires = _expires_after(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
    record = await store.put_file(
        _tenant(request), upload.filename or "batch.jsonl", "batch", data, expires_s=expires
    )
    return _json(public(record))


def _expires_after(anchor: object, seconds: object) -> int | None:
    """The multipart `expires_after[anchor]` and `expires_after[seconds]` (as the openai client
    sends them): the file's lifetime in seconds, None when not given (30 days)."""
    if anchor is None and seconds is None:
        return None
    try:
        expires = ExpiresAfter(anchor=str(anchor), seconds=int(str(seconds)))  # type: ignore[arg-type]
        msgspec.convert(msgspec.to_builtins(expires), ExpiresAfter).validate()
    except (ValueError, msgspec.ValidationError) as exc:
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, f"`expires_after` needs anchor=created_at and seconds: {exc}"
        ) from exc
    return expires.seconds


@get("/files", summary="The caller's files, newest first")
async def list_files(
    request: Request[Any, Any, Any],
    store: Store,
    *,
    purpose: FromQuery[str | None] = None,
    after: FromQuery[str | None] = None,
    limit: FromQuery[int] = 10_000,
    order: FromQuery[str] = "desc",
) -> Response[bytes]:
    if not 1 <= limit <= 10_000:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`limit` must be between 1 and 10000")
    if order not in ("asc", "desc"):
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`order` must be asc or desc")
    files = [f for f in await store.files_of(_tenant(request)) if purpose is None or f.purpose == purpose]
    if order == "asc":
        files.reverse()
    return _json(_page(files, after, limit))


def _page(items: list[Any], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the items after the one with id `after`, at most `limit`."""
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": [public(item) for item in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(items) > limit,
    }


@get("/files/{file_id:str}", summary="A file's record")
async def show_file(request: Request[Any, Any, Any], store: Store, file_id: FromPath[str]) -> Response[bytes]:
    return _json(public(await store.file(file_id, _tenant(request))))


@get("/files/{file_id:str}/content", summary="A file's content")
async def file_content(
    request: Request[Any, Any, Any], store: Store, file_id: FromPath[str]
) -> Response[bytes]:
    data = await store.content(file_id, _tenant(request))
    return Response(data, media_type="application/octet-stream")


@delete("/files/{file_id:str}", summary="Delete a file", status_code=200)
async def delete_file(
    request: Request[Any, Any, Any], store: Store, file_id: FromPath[str]
) -> Response[bytes]:
    await store.delete_file(file_id, _tenant(request))
    return _json({"id": file_id, "object": "file", "deleted": True})


@post("/batches", summary="Create a batch", status_code=200)
async def create_batch(
    request: Request[Any, Any, Any],
    store: Store,
    settings: NamedDependency[Settings],
    data: JSONBody[CreateBatchBody],
) -> Response[bytes]:
    if data.endpoint not in ENDPOINTS:
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"`endpoint` must be one of {', '.join(ENDPOINTS)}")
    window = COMPLETION_WINDOW_S.get(data.completion_window)
    if window is None:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`completion_window` must be 24h")
    if data.output_expires_after is not None:
        try:
            data.output_expires_after.validate()
        except ValueError as exc:
            raise LlmbusError(ErrorCode.BAD_REQUEST, f"`output_expires_after`: {exc}") from exc
    tenant = _tenant(request)
    source = await store.file(data.input_file_id, tenant)
    if source.purpose != "batch":
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"file {source.id} is not a `purpose=batch` file")
    await check_active(store, settings, tenant)
    now = int(time.time())
    batch = Batch(
        id=new_id("batch"),
        endpoint=data.endpoint,
        input_file_id=source.id,
        completion_window=data.completion_window,
        created_at=now,
        expires_at=now + window,
        metadata=data.metadata,
        tenant=tenant,
        output_expires_s=data.output_expires_after.seconds if data.output_expires_after else None,
    )
    await store.create_batch(batch)
    return _json(public(batch))


async def check_active(store: BatchStore, settings: Settings, tenant: str) -> None:
    """429 `rate_limited` when the tenant has `LLMBUS_BATCH_MAX_ACTIVE` unfinished batches."""
    active = [batch for batch in await store.batches(tenant) if batch.status in ACTIVE]
    if len(active) >= settings.batch_max_active:
        raise LlmbusError(
            ErrorCode.RATE_LIMITED,
            f"at most {settings.batch_max_active} unfinished batches at once; wait for one to end",
            retry_after=60,
        )


@get("/batches/{batch_id:str}", summary="A batch")
async def show_batch(
    request: Request[Any, Any, Any], store: Store, batch_id: FromPath[str]
) -> Response[bytes]:
    return _json(public(await store.batch(batch_id, _tenant(request))))


@get("/batches", summary="The caller's batches, newest first")
async def list_batches(
    request: Request[Any, Any, Any],
    store: Store,
    after: FromQuery[str | None] = None,
    limit: FromQuery[int] = 20,
) -> Response[bytes]:
    if not 1 <= limit <= 100:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`limit` must be between 1 and 100")
    return _json(_page(await store.batches(_tenant(request)), after, limit))


@post("/batches/{batch_id:str}/cancel", summary="Cancel a batch", status_code=200)
async def cancel_batch(
    request: Request[Any, Any, Any], store: Store, batch_id: FromPath[str]
) -> Response[bytes]:
    return _json(public(await cancel(store, batch_id, _tenant(request))))


async def cancel(store: BatchStore, batch_id: str, tenant: str) -> Batch:
    """Asks the batcher to stop the batch (`cancelling`); a batch ending or ended stays as it is."""
    await store.batch(batch_id, tenant)
    now = int(time.time())

    def cancelling(batch: Batch) -> Batch | None:
        if batch.status not in ("validating", "in_progress"):
            return None
        return msgspec.structs.replace(batch, status="cancelling", cancelling_at=now)

    return await store.update_batch(batch_id, cancelling)


def router(settings: Settings) -> Router:
    """The routes; the upload's body limit is the batch file limit, not the edge's JSON one."""
    upload = post(
        "/files",
        summary="Upload a batch input file (multipart, purpose=batch)",
        status_code=200,
        request_max_body_size=settings.batch_max_file_bytes + MULTIPART_ROOM,
    )(upload_file)
    return Router(
        path="/openai/v1",
        route_handlers=[
            upload,
            list_files,
            show_file,
            file_content,
            delete_file,
            create_batch,
            show_batch,
            list_batches,
            cancel_batch,
        ],
        tags=["OpenAI-compatible batches"],
        dependencies={"store": Provide(store_of, use_cache=False)},
        exception_handlers=handlers(openai_error),  # type: ignore[arg-type]
    )
