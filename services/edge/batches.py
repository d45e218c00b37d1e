"""llmbus's own batch API: `POST /v1/batches` with the lines inline (each the body of a native
endpoint), progress as SSE, the answers as JSONL. The same batches as OpenAI's Batch API
(services/edge/compat/openai_batches.py): the lines become a stored input file, `llmbus batcher`
runs them, and either API reads the batch. docs/batches.md describes both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from contracts import ErrorCode, LlmbusError
from contracts.batches import Batch, BatchDone, BatchEvent, BatchProgress, NativeBatchBody, public
from services.edge.auth import tenant_of
from services.edge.compat.openai_batches import COMPLETION_WINDOW_S, cancel, check_active, store_of
from services.runtime.batch_store import BatchStore, new_id
from services.runtime.settings import Settings

_encode = msgspec.json.Encoder().encode
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
POLL_S = 0.5  # the batcher writes progress twice a second
KEEPALIVE_S = 15.0  # an SSE comment when nothing changed for this long (proxies close idle streams)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

Store = NamedDependency[BatchStore]


def _json(obj: Any, status: int = 200) -> Response[bytes]:
    return Response(_encode(obj), status_code=status, media_type="application/json")


@post(
    "/v1/batches", summary="Run a batch of native requests (lines inline; progress as SSE)", status_code=200
)
async def create_native_batch(
    request: Request[Any, Any, Any],
    store: Store,
    settings: NamedDependency[Settings],
    data: JSONBody[NativeBatchBody],
) -> Response[bytes] | Stream:
    if not data.lines:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`lines` is empty")
    if len(data.lines) > settings.batch_max_lines:
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"a batch may have at most {settings.batch_max_lines} lines")
    tenant = tenant_of(request).name
    await check_active(store, settings, tenant)
    # The input file in the batch line format the batcher reads (a line it cannot run goes to the
    # error file with its reason, as in OpenAI's API).
    rows = [
        {"custom_id": line.custom_id or str(i), "method": "POST", "url": data.endpoint, "body": line.body}
        for i, line in enumerate(data.lines)
    ]
    content = b"".join(_encode(row) + b"\n" for row in rows)
    if len(content) > settings.batch_max_file_bytes:
        raise LlmbusError(
            ErrorCode.REQUEST_TOO_LARGE, f"a batch may have at most {settings.batch_max_file_bytes} bytes"
        )
    source = await store.put_file(tenant, "inline.jsonl", "batch", content)
    now = int(time.time())
    batch = Batch(
        id=new_id("batch"),
        endpoint=data.endpoint,
        input_file_id=source.id,
        completion_window="24h",
        created_at=now,
        expires_at=now + COMPLETION_WINDOW_S["24h"],
        metadata=data.metadata,
        tenant=tenant,
    )
    await store.create_batch(batch)
    if data.stream:
        return _progress_stream(store, batch.id, tenant)
    return _json(public(batch))


@get("/v1/batches/{batch_id:str}", summary="A batch (the same object as OpenAI's Batch API)")
async def show_native_batch(
    request: Request[Any, Any, Any], store: Store, batch_id: FromPath[str]
) -> Response[bytes]:
    return _json(public(await store.batch(batch_id, tenant_of(request).name)))


@get("/v1/batches/{batch_id:str}/events", summary="A batch's progress as SSE, ending with `done`")
async def native_batch_events(
    request: Request[Any, Any, Any], store: Store, batch_id: FromPath[str]
) -> Stream:
    tenant = tenant_of(request).name
    await store.batch(batch_id, tenant)  # not found: 404 now, not an empty stream
    return _progress_stream(store, batch_id, tenant)


@get("/v1/batches/{batch_id:str}/output", summary="A finished batch's answers (JSONL), then its errors")
async def native_batch_output(
    request: Request[Any, Any, Any], store: Store, batch_id: FromPath[str]
) -> Response[bytes]:
    tenant = tenant_of(request).name
    batch = await store.batch(batch_id, tenant)
    if batch.status not in TERMINAL or batch.output_file_id is None:
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, f"batch {batch_id} is {batch.status}: its output is not written yet"
        )
    data = await store.content(batch.output_file_id, tenant)
    if batch.error_file_id:
        data += await store.content(batch.error_file_id, tenant)
    return Response(data, media_type="application/jsonl")


@post("/v1/batches/{batch_id:str}/cancel", summary="Cancel a batch", status_code=200)
async def cancel_native_batch(
    request: Request[Any, Any, Any], store: Store, batch_id: FromPath[str]
) -> Response[bytes]:
    return _json(public(await cancel(store, batch_id, tenant_of(request).name)))


def _progress_stream(store: BatchStore, batch_id: str, tenant: str) -> Stream:
    return Stream(progress(store, batch_id, tenant), media_type="text/event-stream", headers=SSE_HEADERS)


async def progress(store: BatchStore, batch_id: str, tenant: str) -> AsyncIterator[bytes]:
    """`progress` whenever the status or counts change, `done` when the batch ends (then the end)."""
    last: BatchEvent | None = None
    quiet_since = time.monotonic()
    while True:
        try:
            batch = await store.batch(batch_id, tenant)
        except LlmbusError:
            raise  # deleted meanwhile: the stream ends
        except Exception:  # NATS away for a moment: the batch goes on, so does the stream
            await asyncio.sleep(POLL_S)
            continue
        event = _event(batch)
        if event != last:
            kind = b"done" if isinstance(event, BatchDone) else b"progress"
            yield b"event: %s\ndata: %s\n\n" % (kind, _encode(event))
            last, quiet_since = event, time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
        if isinstance(event, BatchDone):
            return
        await asyncio.sleep(POLL_S)


def _event(batch: Batch) -> BatchEvent:
    counts = batch.request_counts
    if batch.status in TERMINAL:
        return BatchDone(
            batch_id=batch.id,
            status=batch.status,
            total=counts.total,
            completed=counts.completed,
            failed=counts.failed,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
        )
    return BatchProgress(
        batch_id=batch.id,
        status=batch.status,
        total=counts.total,
        completed=counts.completed,
        failed=counts.failed,
    )


def router() -> Router:
    return Router(
        path="/",
        route_handlers=[
            create_native_batch,
            show_native_batch,
            native_batch_events,
            native_batch_output,
            cancel_native_batch,
        ],
        tags=["Batches"],
        dependencies={"store": Provide(store_of, use_cache=False)},
    )
