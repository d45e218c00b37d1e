"""The one answer pipeline every HTTP API calls: validate, submit, then stream or answer once.

An API is a `Dialect`: how it frames a stream, how it collects and renders one answer, and how
it renders an error (its routers' exception handlers use the same `error`). `Pipeline.serve`
(the pipeline bound to the HTTP request) does the rest,
the same way for all of them: the request's one validation before anything is queued, the submit
(admission, publish, the event feed), the relay of a stream (the feed is closed when the client
leaves, which cancels the request), the wait for one answer (499 when the client hangs up first),
and a terminal `error` event turned into the API's error response.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec
from litestar import Request, Response
from litestar.di import NamedDependency
from litestar.response import Stream

from contracts import EmbedRequest, Error, Event, GenerateRequest, LlmbusError
from contracts.headers import CACHE as CACHE_HEADER
from contracts.queue import Queued
from services.edge import image_fetch
from services.edge.auth import origin_of
from services.edge.dispatch import Dispatcher
from services.edge.errors import native_error, request_id_of
from services.edge.hangup import ClientGone, unless_client_leaves
from services.edge.images import Shrunk, shrink
from services.edge.sse import frame
from services.edge.waiting import Items, while_queued
from services.runtime.events import RawEvent
from services.runtime.settings import Settings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
GONE = 499  # the client hung up before its answer: nobody reads this status

_encode = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(Event).decode
PRELUDE = frozenset({"start", "routed"})  # the events before the model's first word

Wire = GenerateRequest | EmbedRequest
Item = list[RawEvent] | Queued  # what a stream writes: a batch of events, or the request's queue place
Answer = Response[bytes] | Stream


class Source(Protocol):
    """Where the events come from: an `EventFeed`, or a task's attempts (services/edge/tasks.py)."""

    request_id: str

    def batches(self) -> AsyncIterator[list[RawEvent]]: ...

    def close(self) -> None: ...


class Cache(Protocol):
    """The response cache (services/edge/response_cache.py): a hit's replay, or the request
    submitted (its events recorded when it may be cached)."""

    async def open(
        self, dispatcher: Dispatcher, wire: Wire, mode: str | None, submit: dict[str, Any]
    ) -> Source: ...


class Dialect:
    """One API's shapes. The defaults are the native API's: SSE frames, JSON answers, native errors.

    A dialect is made per request (it may keep state while it frames a stream).
    """

    media_type = "text/event-stream"
    streams = False  # this request's answer is a stream
    # The stream's HTTP status waits for the model's first word, so an error before it (an unknown
    # model) is a status, as OpenAI's and Ollama's own streams answer it: their clients raise on it.
    status_waits = False
    ended = False  # set by `frame` when the stream must stop early (a compat stream that diverged)
    shrunk = Shrunk()  # what `LLMBUS_IMAGE_*` did to the request's images (services/edge/images.py)

    def check(self, wire: Wire) -> None:
        """Checks of this API beyond the wire request's own (an embed request's limits)."""

    async def open(self, dispatcher: Dispatcher, wire: Wire, submit: dict[str, Any]) -> Source:
        """Submits the request; a task overrides this to run up to two requests."""
        return await dispatcher.submit(wire, **submit)

    def at_once(self, source: Source) -> Response[bytes] | None:
        """An answer that needs no events (a deferred request's 202, a resume past the end)."""
        return None

    def frame(self, batch: list[RawEvent]) -> bytes:
        return frame(batch)

    def tail(self) -> bytes:
        """What a stream ends with after its terminal event (OpenAI's `data: [DONE]`)."""
        return b""

    shows_queue = False  # this API tells a waiting request its place (`queued`, services/edge/waiting.py)

    def queued(self, status: Queued) -> bytes:
        """A `queued` status as this API frames it (only called when `shows_queue`)."""
        return b""

    async def collect(self, source: Source) -> Any:
        """The answer (or the `Error` event that ended the request)."""
        raise NotImplementedError

    def answer(self, result: Any, request_id: str) -> Response[bytes]:
        return Response(_encode(result), media_type="application/json", headers={"X-Request-Id": request_id})

    error = staticmethod(native_error)  # also its routes' exception handler (services/edge/errors.py)


class Pipeline:  # a handler's parameter `pipeline: Piped`
    """The pipeline bound to one HTTP request: what every API's handler is given (the `pipeline`
    dependency, services/edge/wiring.py), with the parts its dialects may need."""

    __slots__ = ("cache", "dispatcher", "request", "settings")

    def __init__(
        self,
        request: Request[Any, Any, Any],
        dispatcher: Dispatcher,
        settings: Settings,
        cache: Cache | None = None,
    ) -> None:
        self.request = request
        self.dispatcher = dispatcher
        self.settings = settings
        self.cache = cache  # the response cache (services/edge/response_cache.py), if on

    @property
    def request_id(self) -> str:
        return request_id_of(self.request)

    @property
    def accepts_events(self) -> bool:
        """The client asked for SSE with its `Accept` header (as EventSource does)."""
        return "text/event-stream" in self.request.headers.get("accept", "")

    async def serve(self, wire: Wire, dialect: Dialect, **submit: Any) -> Response[bytes] | Stream:
        """`submit`: `Dispatcher.submit`'s keywords (timeout_s, subject, idempotent, detached,
        after); the tenant is the authenticated caller (`request.user`)."""
        request = self.request
        wire.validate()  # the request's one check before anything is queued
        image_fetch.check_sizes(wire, self.settings.max_image_bytes)
        dialect.check(wire)
        if isinstance(wire, GenerateRequest):  # every API's images, shrunk before they are queued
            wire, dialect.shrunk = await shrink(self.settings, wire)
        caller = {"tenant": request.user, "origin": origin_of(request)}
        mode = submit.pop("cache", None) or request.headers.get(CACHE_HEADER)  # the request's cache mode
        if self.cache is not None and type(dialect).open is Dialect.open:  # (a task runs its own attempts)
            source = await self.cache.open(self.dispatcher, wire, mode, caller | submit)
        else:
            source = await dialect.open(self.dispatcher, wire, caller | submit)
        cached = {CACHE_HEADER: source.cache_status} if hasattr(source, "cache_status") else {}
        early = dialect.at_once(source)
        if early is not None:
            return early
        if dialect.streams:
            items = while_queued(source, dialect.shows_queue)
            head: list[Item] = []
            if dialect.status_waits:
                try:
                    head = await unless_client_leaves(request, source, _head(items), close=False)
                except ClientGone:
                    return Response(b"", status_code=GONE)
                if (failed := _first_error(head)) is not None:
                    source.close()
                    raise LlmbusError(failed.code, failed.message, retry_after=failed.retry_after)
            return Stream(
                relay(source, dialect, items, head),
                media_type=dialect.media_type,
                headers={**SSE_HEADERS, "X-Request-Id": source.request_id, **cached},
            )
        try:
            result = await unless_client_leaves(request, source, dialect.collect(source))
        except ClientGone:
            return Response(b"", status_code=GONE)
        if isinstance(result, Error):  # rendered by the API's exception handler, which records its code
            raise LlmbusError(result.code, result.message, retry_after=result.retry_after)
        response = dialect.answer(result, source.request_id)
        response.headers.update(cached)
        return response


async def _head(items: Items) -> list[Item]:
    """What a stream starts with: the items up to the model's first event past the prelude, or up
    to the request's first place in the queue (it waits behind others: the status goes out so that
    its place can be shown), or all of them if the feed ends."""
    head: list[Item] = []
    async for item in items:  # leaving the loop leaves the generator open for the relay
        head.append(item)
        if isinstance(item, Queued) or any(event.type not in PRELUDE for event, _ in item):
            break
    return head


def _first_error(head: list[Item]) -> Error | None:
    """The stream's first event past the prelude, if it is an error (an unknown model, say)."""
    for item in head:
        if isinstance(item, Queued):
            return None
        for event, data in item:
            if event.type not in PRELUDE:
                first = _decode_event(data)
                return first if isinstance(first, Error) else None
    return None


async def relay(
    source: Source, dialect: Dialect, items: Items | None = None, head: list[Item] | None = None
) -> AsyncIterator[bytes]:
    """A stream's body, one write per batch of events: `head`, what was read already (a status
    wait), then `items`, the source's batches with its `queued` places. Litestar cancels this
    generator when the client disconnects; closing the source then cancels the request upstream."""
    if items is None:
        items = while_queued(source, dialect.shows_queue)
    try:
        for item in head or ():
            chunk = _written(dialect, item)
            if chunk:
                yield chunk
            if dialect.ended:
                break
        if not dialect.ended:
            async for item in items:
                chunk = _written(dialect, item)
                if chunk:
                    yield chunk
                if dialect.ended:
                    break
        tail = dialect.tail()
        if tail:
            yield tail
    finally:
        source.close()
        aclose = getattr(items, "aclose", None)
        if aclose is not None:  # the looking stops now, not when the collector finds it
            with contextlib.suppress(Exception):
                await aclose()


def _written(dialect: Dialect, item: Item) -> bytes:
    return dialect.queued(item) if isinstance(item, Queued) else dialect.frame(item)


Piped = NamedDependency[Pipeline]  # how a handler asks for its pipeline
