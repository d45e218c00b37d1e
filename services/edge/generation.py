"""`POST /v1/chat` and `POST /v1/generate`: validate, publish, then stream SSE or answer once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.params import JSONBody
from litestar.response import Stream

from contracts import Completion, Done, Error, ErrorCode, Event, LlmbusError, Restart, Routed, Token, subjects
from services.edge.admission import request_id_for_key
from services.edge.bodies import ChatBody, GenerateBody
from services.edge.dispatch import Dispatcher, EventFeed
from services.edge.errors import error_response, request_id_of
from services.edge.hangup import ClientGone, unless_client_leaves
from services.edge.requests import deferred, last_event_id, no_more_events
from services.edge.sse import frame

_decode_event = msgspec.json.Decoder(Event).decode
_encode = msgspec.json.Encoder().encode

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@post("/v1/chat", summary="Chat with a model", status_code=200)
async def chat(request: Request[Any, Any, Any], data: JSONBody[ChatBody]) -> Response[bytes] | Stream:
    return await _generate(request, data)


@post("/v1/generate", summary="Complete a prompt", status_code=200)
async def generate(request: Request[Any, Any, Any], data: JSONBody[GenerateBody]) -> Response[bytes] | Stream:
    return await _generate(request, data)


async def _generate(
    request: Request[Any, Any, Any], body: ChatBody | GenerateBody
) -> Response[bytes] | Stream:
    key = idempotency_key(request)
    request_id = key or request_id_of(request)
    wire = body.to_request(request_id)
    wire.validate()
    dispatcher: Dispatcher = request.app.state.dispatcher
    detached = body.stream == "deferred"
    streams = not detached and (
        body.stream is True or "text/event-stream" in request.headers.get("accept", "")
    )
    feed = await dispatcher.submit(
        wire,
        body.timeout,
        idempotent=key is not None,
        detached=detached,
        # A retry resumes a stream after its Last-Event-ID; a JSON answer is always the whole one.
        after=last_event_id(request) if key and streams else -1,
    )
    if detached:
        dispatcher.detach(feed)  # the client follows it at the events URL, on any edge
        return deferred(request_id)
    if streams:
        if feed.nothing_after:
            return no_more_events(feed)
        return Stream(
            _sse(feed), media_type="text/event-stream", headers={**SSE_HEADERS, "X-Request-Id": request_id}
        )
    return await _until_done_or_disconnect(request, feed, wire.model)


def idempotency_key(request: Request[Any, Any, Any]) -> str | None:
    """The `Idempotency-Key` header, which becomes the request id: a retry attaches to that request."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not subjects.REQUEST_ID.match(key):
        raise LlmbusError(ErrorCode.BAD_REQUEST, "Idempotency-Key must be 8-128 characters of [A-Za-z0-9_-]")
    key = request_id_for_key(key)  # namespaced per tenant: another tenant's key never attaches here
    request.scope.setdefault("state", {})["request_id"] = key  # errors name it too
    return key


async def _sse(feed: EventFeed) -> AsyncIterator[bytes]:
    # Litestar cancels this generator when the client disconnects; `close` then cancels upstream.
    try:
        async for batch in feed.batches():
            yield frame(batch)
    finally:
        feed.close()


async def _until_done_or_disconnect(
    request: Request[Any, Any, Any], feed: EventFeed, model: str
) -> Response[bytes]:
    try:
        result = await unless_client_leaves(request, feed, collect(feed, model))
    except ClientGone:
        return Response(b"", status_code=499)  # nobody is listening any more
    if isinstance(result, Error):
        return error_response(result.code, result.message, feed.request_id, result.retry_after)
    return Response(_encode(result), media_type="application/json", headers={"X-Request-Id": feed.request_id})


async def collect(feed: EventFeed, model: str) -> Completion | Error:
    """A request's answer as one `Completion` (text before a `restart` dropped), or its error."""
    parts: list[str] = []
    routed: Routed | None = None
    async for batch in feed.batches():
        for _, data in batch:
            event = _decode_event(data)
            if isinstance(event, Token):
                parts.append(event.text)
            elif isinstance(event, Restart):
                parts.clear()  # a new attempt starts the answer over
            elif isinstance(event, Routed):
                routed = event
            elif isinstance(event, Done):
                return Completion(
                    request_id=feed.request_id,
                    model=model if routed is None else routed.model,
                    text="".join(parts),
                    finish_reason=event.finish_reason,
                    usage=event.usage,
                    timings=event.timings,
                    routed=routed,
                )
            elif isinstance(event, Error):
                return event
    raise RuntimeError("event feed ended without a terminal event")  # feeds always end with one
