"""Publishing a request onto JetStream and following its events: the edge's whole bus side."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError

from contracts import (
    TERMINAL_TYPES,
    Error,
    ErrorCode,
    EventHead,
    GenerateRequest,
    LlmbusError,
    headers,
    subjects,
)
from services.runtime import tracing

_encode = msgspec.json.Encoder().encode
_decode_head = msgspec.json.Decoder(EventHead).decode

# One raw event: its head (type, seq) and the payload exactly as the worker encoded it, so the
# relay never re-encodes a token.
RawEvent = tuple[EventHead, bytes]


class EventFeed:
    """The events of one request, in order, ending after its terminal event or its deadline."""

    def __init__(self, nc: Client, request_id: str, deadline: float) -> None:
        self._nc = nc
        self.request_id = request_id
        self.deadline = deadline  # event-loop time
        self.finished = False
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def subscribe(self) -> None:
        async def put(msg: Msg) -> None:
            self._queue.put_nowait(msg)

        # A callback subscription: nats-py runs one task per subscription, not one per message.
        self._sub = await self._nc.subscribe(subjects.event_subject(self.request_id), cb=put)

    async def batches(self) -> AsyncIterator[list[RawEvent]]:
        """Yields every event already queued at once, so a burst costs one write downstream."""
        queue = self._queue
        try:
            async with asyncio.timeout_at(self.deadline):
                while not self.finished:
                    batch = [await queue.get()]
                    while not queue.empty():
                        batch.append(queue.get_nowait())
                    out: list[RawEvent] = []
                    for msg in batch:
                        head = _decode_head(msg.data)
                        out.append((head, msg.data))
                        if head.type in TERMINAL_TYPES:
                            self.finished = True
                            break
                    yield out
        except TimeoutError:
            self.finished = True
            error = Error(
                seq=-1,
                attempt=0,
                code=ErrorCode.DEADLINE_EXCEEDED,
                message="no result within the request's deadline",
            )
            self.cancel()
            yield [(EventHead(type="error", seq=-1), _encode(error))]

    def cancel(self) -> None:
        """Asks workers to stop this request."""
        _in_background(self._nc.publish(subjects.cancel_subject(self.request_id)))

    def close(self) -> None:
        """Cancels upstream unless the request ended, and unsubscribes.

        It does not await, so it is safe in the `finally` of a task being cancelled (a client that
        hung up): the work is handed to background tasks.
        """
        if not self.finished:
            self.cancel()
        _in_background(self._sub.unsubscribe())


_background: set[asyncio.Task[None]] = set()


def _in_background(coro: Coroutine[Any, Any, None]) -> None:
    async def quietly() -> None:
        with contextlib.suppress(Exception):
            await coro

    task = asyncio.get_running_loop().create_task(quietly())
    _background.add(task)
    task.add_done_callback(_background.discard)


class Dispatcher:
    def __init__(self, nc: Client, *, max_timeout_s: float) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.max_timeout_s = max_timeout_s

    async def submit(self, request: GenerateRequest, timeout_s: float | None = None) -> EventFeed:
        """Persists the request on JetStream; returns its event feed, subscribed before publishing."""
        timeout = min(timeout_s or self.max_timeout_s, self.max_timeout_s)
        loop = asyncio.get_running_loop()
        feed = EventFeed(self.nc, request.id, loop.time() + timeout)
        await feed.subscribe()
        subject = subjects.generate_subject(request.model)
        hdrs = {
            headers.MSG_ID: request.id,
            headers.REPLY: subjects.event_subject(request.id),
            headers.DEADLINE: str(int((time.time() + timeout) * 1000)),
        }
        try:
            with tracing.publish_span(subject, request.id, hdrs):
                await self.js.publish(subject, _encode(request), headers=hdrs, timeout=5)
        except (NoStreamResponseError, NoRespondersError, NatsTimeoutError, TimeoutError) as exc:
            feed.finished = True
            feed.close()
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, "the request queue is unavailable", retry_after=1
            ) from exc
        return feed
