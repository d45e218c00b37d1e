"""A request as a resource: follow it again, cancel it, or start it without waiting.

* `GET /v1/requests/{id}/events`: the request's events as SSE, from the start or after the SSE
  `Last-Event-ID` header (or `?after=N`), then live until its terminal event. Works on any edge,
  for a request that is queued, running or finished within `LLMBUS_EVENT_MAX_AGE_S`; hanging up
  never cancels it. A request that ended at or before `Last-Event-ID` answers `204 No Content` at
  once (nothing follows; a browser's EventSource stops reconnecting on a 204).
* `DELETE /v1/requests/{id}`: cancels it; it ends with `error` `cancelled`.
* `POST /v1/chat|generate` with `"stream": "deferred"` answers `202` at once with the id and the
  events URL (see `deferred`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, delete, get
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from contracts import ErrorCode, LlmbusError
from contracts.base import check_id
from services.edge.errors import set_request_id
from services.edge.feed import EventFeed
from services.edge.serve import SSE_HEADERS, Dialect, Piped, relay

_encode = msgspec.json.Encoder().encode


class Deferred(msgspec.Struct):
    """The `202` answer to a deferred request: where to follow it and how to cancel it."""

    request_id: str
    events_url: str
    status: str = "accepted"


class Cancelled(msgspec.Struct):
    request_id: str
    status: str  # "cancelling": workers were told; "ended": it had already ended


def events_url(request_id: str) -> str:
    return f"/v1/requests/{request_id}/events"


def deferred(request_id: str) -> Response[bytes]:
    url = events_url(request_id)
    return Response(
        _encode(Deferred(request_id=request_id, events_url=url)),
        status_code=202,
        media_type="application/json",
        headers={"X-Request-Id": request_id, "Location": url},
    )


def last_event_id(request: Request[Any, Any, Any], after: int | None = None) -> int:
    """The last `seq` the client has: `Last-Event-ID` (what EventSource sends on reconnect) or `after`."""
    raw = request.headers.get("last-event-id")
    if raw is None or not raw.strip():
        return -1 if after is None else after
    try:
        value = int(raw.strip())
    except ValueError:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "Last-Event-ID must be an event's integer id") from None
    if value < -1:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "Last-Event-ID must be -1 or more")
    return value


def no_more_events(feed: EventFeed) -> Response[bytes]:
    """The answer to a resume at or past the request's end: nothing follows, and it says so."""
    feed.close()
    return Response(b"", status_code=204, headers={"X-Request-Id": feed.request_id})


@get(
    "/v1/requests/{request_id:str}/events",
    summary="Follow a request's events (SSE), resuming after Last-Event-ID",
)
async def request_events(
    request_id: FromPath[str], pipeline: Piped, after: FromQuery[int | None] = None
) -> Stream | Response[bytes]:
    request = pipeline.request
    set_request_id(request, check_id(request_id, "a request id"))
    after = last_event_id(request, after)
    feed = await pipeline.dispatcher.attach(request_id, after=after, tenant=request.user)
    if feed.nothing_after:
        return no_more_events(feed)
    return Stream(
        relay(feed, Dialect()),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, "X-Request-Id": request_id},
    )


@delete("/v1/requests/{request_id:str}", summary="Cancel a request", status_code=202)
async def cancel_request(request_id: FromPath[str], pipeline: Piped) -> Response[bytes]:
    set_request_id(pipeline.request, check_id(request_id, "a request id"))
    cancelling = await pipeline.dispatcher.cancel(request_id, tenant=pipeline.request.user)
    answer = Cancelled(request_id=request_id, status="cancelling" if cancelling else "ended")
    return Response(
        _encode(answer),
        status_code=202 if cancelling else 200,
        media_type="application/json",
        headers={"X-Request-Id": request_id},
    )
