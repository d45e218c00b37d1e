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

from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec
from litestar import Request, Response
from litestar.di import NamedDependency
from litestar.response import Stream

from contracts import EmbedRequest, Error, Event, GenerateRequest, LlmbusError
from services.edge import image_fetch
from services.edge.auth import origin_of
from services.edge.dispatch import Dispatcher
from services.edge.errors import native_error, request_id_of
from services.edge.hangup import ClientGone, unless_client_leaves
from services.edge.images import Shrunk, shrink
from services.edge.sse import frame
from services.runtime.events import RawEvent
from services.runtime.settings import Settings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
GONE = 499  # the client hung up before its answer: nobody reads this status

_encode = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(Event).decode
PRELUDE = frozenset({"start", "routed"})  # the events before the model's first word

Wire = GenerateRequest | EmbedRequest
Answer = Response[bytes] | Stream


class Source(Protocol):
    """Where the events come from: an `EventFeed`, or a task's attempts (services/edge/tasks.py)."""

    request_id: str

    def batches(self) -> AsyncIterator[list[RawEvent]]: ...

    def close(self) -> None: ...


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

    async def collect(self, source: Source) -> Any:
        """The answer (or the `Error` event that ended the request)."""
        raise NotImplementedError

    def answer(self, result: Any, request_id: str) -> Response[bytes]:
        return Response(_encode(result), media_type="application/json", headers={"X-Request-Id": request_id})

    error = staticmethod(native_error)  # also its routes' exception handler (services/edge/errors.py)


class Pipeline:  # a handler's parameter `pipeline: Piped`
    """The pipeline bound to one HTTP request: what every API's handler is given (the `pipeline`
    dependency, services/edge/wiring.py), with the parts its dialects may need."""

    __slots__ = ("dispatcher", "request", "settings")

    def __init__(self, request: Request[Any, Any, Any], dispatcher: Dispatcher, settings: Settings) -> None:
        self.request = request
        self.dispatcher = dispatcher
        self.settings = settings

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
        source = await dialect.open(self.dispatcher, wire, caller | submit)
        early = dialect.at_once(source)
        if early is not None:
            return early
        if dialect.streams:
            batches = source.batches()
            head: list[list[RawEvent]] = []
            if dialect.status_waits:
                try:
                    head = await unless_client_leaves(request, source, _head(batches), close=False)
                except ClientGone:
                    return Response(b"", status_code=GONE)
                if (failed := _first_error(head)) is not None:
                    source.close()
                    raise LlmbusError(failed.code, failed.message, retry_after=failed.retry_after)
            return Stream(
                relay(source, dialect, _chained(head, batches)),
                media_type=dialect.media_type,
                headers={**SSE_HEADERS, "X-Request-Id": source.request_id},
            )
        try:
            result = await unless_client_leaves(request, source, dialect.collect(source))
        except ClientGone:
            return Response(b"", status_code=GONE)
        if isinstance(result, Error):  # rendered by the API's exception handler, which records its code
            raise LlmbusError(result.code, result.message, retry_after=result.retry_after)
        return dialect.answer(result, source.request_id)


async def _head(batches: AsyncIterator[list[RawEvent]]) -> list[list[RawEvent]]:
    """The batches up to and with the first event past the prelude (or all, if the feed ends)."""
    head = []
    async for batch in batches:  # leaving the loop leaves the generator open for the relay
        head.append(batch)
        if any(event.type not in PRELUDE for event, _ in batch):
            break
    return head


def _first_error(head: list[list[RawEvent]]) -> Error | None:
    for event, data in (item for batch in head for item in batch):
        if event.type not in PRELUDE:
            first = _decode_event(data)
            return first if isinstance(first, Error) else None
    return None


async def _chained(
    head: list[list[RawEvent]], rest: AsyncIterator[list[RawEvent]]
) -> AsyncIterator[list[RawEvent]]:
    for batch in head:
        yield batch
    async for batch in rest:
        yield batch


async def relay(
    source: Source, dialect: Dialect, batches: AsyncIterator[list[RawEvent]] | None = None
) -> AsyncIterator[bytes]:
    """A stream's body, one write per batch of events (`batches`: the source's, some perhaps read
    already). Litestar cancels this generator when the client disconnects; closing the source then
    cancels the request upstream."""
    try:
        async for batch in batches if batches is not None else source.batches():
            chunk = dialect.frame(batch)
            if chunk:
                yield chunk
            if dialect.ended:
                break
        tail = dialect.tail()
        if tail:
            yield tail
    finally:
        source.close()


Piped = NamedDependency[Pipeline]  # how a handler asks for its pipeline
