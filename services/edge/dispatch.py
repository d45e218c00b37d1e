"""Publishing a request onto JetStream and following its events: the edge's whole bus side.

A feed follows `llm.out.<id>` live (a core subscription made before the request is published, so
nothing is missed) and falls back on the copy in `LLM_OUT` whenever the live path cannot be
trusted: to replay a request it attaches to (resume, an idempotent retry), to fill a gap in the
numbering (the edge's NATS connection dropped for a moment) and when it has heard nothing for a
while. Every event passes one `Sequencer`, so the client gets each `seq` once and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError

from contracts import (
    TERMINAL_TYPES,
    Accepted,
    EmbedRequest,
    Error,
    ErrorCode,
    EventHead,
    GenerateRequest,
    LlmbusError,
    headers,
    subjects,
)
from contracts.route import ROUTE_SUBJECT, is_routed
from services.edge import observability
from services.edge.admission import Admission, Ticket
from services.edge.backlog import Slot
from services.edge.routing import RouteFallback
from services.runtime import bus, events, tracing
from services.runtime.events import RawEvent, Sequencer
from services.runtime.inventory import InventoryView
from services.runtime.retry import Backoff, with_backoff

__all__ = ["Dispatcher", "EventFeed", "RawEvent"]

log = logging.getLogger("llmbus.edge")

_encode = msgspec.json.Encoder().encode
_decode_head = msgspec.json.Decoder(EventHead).decode
_decode_accepted = msgspec.json.Decoder(Accepted).decode

# A gap in the numbering is waited for this long (a worker that reconnected, or saw the event
# stream's leader change, republishes what did not make it), then filled from LLM_OUT or skipped.
GAP_WAIT_S = 5.0
# After its deadline a feed waits this long for the worker's own terminal event (a worker stops a
# running request at the same deadline) before the edge ends the request itself (`_end_at_deadline`).
TERMINAL_GRACE_S = 2.0
# A feed that hears nothing looks at LLM_OUT after this long, then less and less often.
IDLE_PROBE_S = 2.0
IDLE_PROBE_MAX_S = 30.0
_STORE_ERRORS = (NatsTimeoutError, NoRespondersError, TimeoutError, OSError)
_PUBLISH_ERRORS = (NoStreamResponseError, NoRespondersError, NatsTimeoutError, TimeoutError)
# How long the edge keeps trying to get a request persisted before it answers 503.
PUBLISH_PATIENCE_S = 6.0
PUBLISH_BACKOFF = Backoff(retries=6, base_s=0.2, max_s=2.0)

Request = GenerateRequest | EmbedRequest


class _Inbox:
    """What the subscription delivered and the feed has not taken yet.

    On the per-token path instead of `asyncio.Queue` plus an `asyncio.timeout` per wait (a
    `Timeout`, a task lookup and a reschedule each time): one future and one timer per wait, and
    a burst is taken as one list.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Msg | None] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Msg | None) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, within: float) -> list[Msg | None]:
        """Everything queued, waiting up to `within` seconds for something; [] if nothing came."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(within, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        items = self._items
        self._items = []
        return items


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class EventFeed:
    """The events of one request, in order, ending after its terminal event (exactly one).

    `after` is the last `seq` the client already has (`Last-Event-ID`); `replay` reads what is
    stored first (a feed attached to a request that may have started); `cancel_on_close` makes a
    client that goes away cancel the request (not for detached or idempotent requests).
    `deadline` is the request's: the feed waits `TERMINAL_GRACE_S` past it for the terminal event.
    """

    def __init__(
        self,
        nc: Client,
        request_id: str,
        deadline: float,
        *,
        after: int = -1,
        replay: bool = False,
        cancel_on_close: bool = True,
    ) -> None:
        self._nc = nc
        self.request_id = request_id
        self.subject = subjects.event_subject(request_id)
        self.deadline = deadline  # event-loop time
        self.replay = replay
        self.cancel_on_close = cancel_on_close
        self.finished = False
        self._sequencer = Sequencer(after)
        self._inbox = _Inbox()  # None in it: look at LLM_OUT now
        self.first_event = asyncio.Event()  # a routed request's proof that a classifier took it
        self.guard: asyncio.Task[None] | None = None  # its bounded wait (services/edge/routing.py)
        self.last: RawEvent | None = None  # the newest event delivered (the terminal one, in the end)
        self.first_token_at: float | None = None  # perf_counter() when the first token was delivered
        self.ticket: Ticket | None = None  # its hold on the tenant's limits, given back on close
        self._sub: Any = None
        self._replayed: list[RawEvent] | None = None  # read by `prefetch`, not yet delivered

    async def subscribe(self) -> None:
        first = self.first_event
        inbox = self._inbox

        async def put(msg: Msg) -> None:
            inbox.put(msg)
            if not first.is_set():
                first.set()

        # A callback subscription: nats-py runs one task per subscription, not one per message.
        self._sub = await self._nc.subscribe(self.subject, cb=put)

    async def prefetch(self) -> None:
        """Reads what is stored now (after subscribing), so `nothing_after` can be asked at once."""
        self._replayed = await self._backfill()
        self.replay = False
        if self._sequencer.ended:
            self.finished = True

    @property
    def nothing_after(self) -> bool:
        """The request ended at or before the client's `Last-Event-ID`: nothing will follow."""
        return self._sequencer.ended and not self._replayed

    async def batches(self) -> AsyncIterator[list[RawEvent]]:
        """Yields every event already queued at once, so a burst costs one write downstream."""
        inbox = self._inbox
        sequencer = self._sequencer
        idle = IDLE_PROBE_S
        try:
            async with asyncio.timeout_at(self.deadline + TERMINAL_GRACE_S):
                out = self._replayed if self._replayed is not None else []
                self._replayed = None
                if self.replay:
                    out = await self._backfill()
                if out:
                    yield self._seen(out)
                while not self.finished:
                    if sequencer.ended:  # at or before `after`: the client has seen the end
                        self.finished = True
                        break
                    out = []
                    items = await inbox.take(GAP_WAIT_S if sequencer.gap else idle)
                    if not items:  # this wait's own bound ran out, not the deadline
                        if sequencer.gap:
                            out = await self._backfill()
                            sequencer.skip_gap(out)  # never wait for an event the bus lost
                        elif await self._stored_newer():
                            out = await self._backfill()
                        idle = min(idle * 2, IDLE_PROBE_MAX_S)
                    else:
                        idle = IDLE_PROBE_S
                        poked = False
                        for msg in items:
                            if msg is None:
                                poked = True
                            else:
                                sequencer.offer(_decode_head(msg.data), msg.data, out)
                        if poked:  # the edge reconnected: events may have passed it by
                            out += await self._backfill()
                    if out:
                        yield self._seen(out)
        except TimeoutError:
            self.cancel()
            out = await self._end_at_deadline()
            self.finished = True
            if out:
                yield self._seen(out)

    async def _end_at_deadline(self) -> list[RawEvent]:
        """No terminal event by the deadline (plus the grace): the edge ends the request itself.

        It stores `error deadline_exceeded` in LLM_OUT right after what is stored (once per
        request: `Nats-Msg-Id`), then delivers LLM_OUT's events, so the live client, a resume and
        a worker that finds the expired request later all see one ending: the first terminal event
        in LLM_OUT, with its `id`. Only when LLM_OUT cannot be reached is the error the edge's own,
        without an `id`.
        """
        message = "no result within the request's deadline"
        out: list[RawEvent] = []
        with contextlib.suppress(*_STORE_ERRORS, *_PUBLISH_ERRORS):
            async with asyncio.timeout(2 * TERMINAL_GRACE_S):
                stored = events.published(await events.read(self._nc, self.subject, wait=2.0))
                if not stored.ended:
                    error = Error(
                        seq=stored.next_seq, attempt=0, code=ErrorCode.DEADLINE_EXCEEDED, message=message
                    )
                    hdrs = {headers.MSG_ID: f"{self.request_id}.deadline"}
                    await self._nc.jetstream().publish(self.subject, _encode(error), headers=hdrs, timeout=2)
                out = await self._backfill()
                if not self._sequencer.ended:
                    self._sequencer.skip_gap(out)
        if self._sequencer.ended:
            return out
        error = Error(seq=-1, attempt=0, code=ErrorCode.DEADLINE_EXCEEDED, message=message)
        return [*out, (EventHead(type="error", seq=-1), _encode(error))]

    def _seen(self, out: list[RawEvent]) -> list[RawEvent]:
        if self._sequencer.ended:
            self.finished = True
        self.last = out[-1]
        if self.first_token_at is None and any(head.type == "token" for head, _ in out):
            self.first_token_at = time.perf_counter()
        return out

    async def _backfill(self) -> list[RawEvent]:
        """What LLM_OUT holds that this feed has not delivered yet, in order."""
        out: list[RawEvent] = []
        with contextlib.suppress(*_STORE_ERRORS):
            for head, data in await events.read(self._nc, self.subject, wait=2.0):
                self._sequencer.offer(head, data, out)
        return out

    async def _stored_newer(self) -> bool:
        """Whether LLM_OUT has an event this feed has not seen (its live delivery was lost)."""
        try:
            data = await events.last(self._nc, self.subject)
        except _STORE_ERRORS:
            return False
        if data is None:
            return False
        head = _decode_head(data)
        return head.seq >= self._sequencer.next or head.type in TERMINAL_TYPES

    def poke(self) -> None:
        """Makes the feed look at LLM_OUT now (its live subscription may have missed events)."""
        self._inbox.put(None)

    def cancel(self) -> None:
        """Asks workers to stop this request."""
        _in_background(self._nc.publish(subjects.cancel_subject(self.request_id)))

    def close(self) -> None:
        """Cancels upstream unless the request ended (or outlives its client), and unsubscribes.

        It does not await, so it is safe in the `finally` of a task being cancelled (a client that
        hung up): the work is handed to background tasks.
        """
        if not self.finished and self.cancel_on_close:
            self.cancel()
        if self.guard is not None:
            self.guard.cancel()
        if self.ticket is not None:
            self.ticket.release(self.last)
        if self._sub is not None:
            # Dropped here: the subscription's task holds the request's context, which holds this
            # feed; without the cycle a finished request is freed at once, not by a full collection.
            _in_background(self._sub.unsubscribe())
            self._sub = None


_background: set[asyncio.Task[None]] = set()


def _in_background(coro: Coroutine[Any, Any, None]) -> None:
    async def quietly() -> None:
        with contextlib.suppress(Exception):
            await coro

    task = asyncio.get_running_loop().create_task(quietly())
    _background.add(task)
    task.add_done_callback(_background.discard)


def fingerprint(request: Request) -> str:
    """Identifies a request's content whatever its id: an `Idempotency-Key` reused for another."""
    body = _encode(msgspec.structs.replace(request, id="-"))
    return hashlib.blake2b(body, digest_size=12).hexdigest()


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        *,
        max_timeout_s: float,
        fallback: RouteFallback | None = None,
        inventory: InventoryView | None = None,
        admission: Admission | None = None,
        provision: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.nc = nc
        self._provision = provision  # what the edge owns on the bus, re-created after a reconnect
        self.admission = admission  # every route's requests pass it before publishing
        self.js = nc.jetstream()
        self.max_timeout_s = max_timeout_s
        self.fallback = fallback
        self.inventory = inventory  # the janitors' models: refuse one no host has, before queueing
        self._feeds: weakref.WeakSet[EventFeed] = weakref.WeakSet()
        # The `accepted` records this edge stored, until their requests' deadlines (oldest first):
        # a restarted NATS loses LLM_OUT (memory), and with it the owner's way to follow or cancel.
        self._records: OrderedDict[str, tuple[Accepted, float]] = OrderedDict()
        self.unsubscribe = bus.reconnects(nc).subscribe(self.after_reconnect)

    def _track(self, feed: EventFeed) -> EventFeed:
        self._feeds.add(feed)
        return feed

    async def after_reconnect(self) -> None:
        """NATS is back, maybe a restarted server without LLM_OUT: re-create what the edge owns,
        store again the `accepted` records of requests still within their deadline, and make
        every open feed look at LLM_OUT (events may have passed it by)."""
        try:
            if self._provision is not None:
                await self._provision()
            loop = asyncio.get_running_loop()
            live = [(a, d) for a, d in self._records.values() if d > loop.time()]
            give_up = loop.time() + PUBLISH_PATIENCE_S
            await asyncio.gather(*(self._record(a, deadline=min(d, give_up)) for a, d in live))
        finally:
            for feed in list(self._feeds):
                if not feed.finished:
                    feed.poke()

    def _remember(self, accepted: Accepted, deadline: float) -> None:
        now = asyncio.get_running_loop().time()
        while self._records and next(iter(self._records.values()))[1] < now:
            self._records.popitem(last=False)
        self._records[accepted.request_id] = (accepted, deadline + TERMINAL_GRACE_S)

    async def submit(
        self,
        request: Request,
        timeout_s: float | None = None,
        *,
        subject: str = "",
        idempotent: bool = False,
        detached: bool = False,
        after: int = -1,
    ) -> EventFeed:
        """Persists the request on JetStream; returns its event feed, subscribed before publishing.

        `subject` defaults to the request's generate subject (`llm.req.generate.<model>`).
        `idempotent`: the id came from an `Idempotency-Key`; if that request was accepted before
        (same content), the feed attaches to it instead of running it again, replaying after
        `after`. `detached`: the request outlives the feed (closing it does not cancel).
        """
        if timeout_s is not None and not timeout_s > 0:  # the compat APIs pass theirs unchecked
            raise LlmbusError(ErrorCode.BAD_REQUEST, "`timeout` must be a positive number of seconds")
        keep = idempotent or detached
        routed = isinstance(request, GenerateRequest) and is_routed(request.model)  # "auto", "route:x"
        subject = subject or (ROUTE_SUBJECT if routed else subjects.generate_subject(request.model))
        ticket = None
        slot = Slot(None, subject)
        if self.admission is not None:
            request, ticket, slot = await self.admission.admit(request, subject)
        try:
            return await self._submit(
                request,
                ticket,
                slot,
                timeout_s,
                subject=subject,
                routed=routed,
                idempotent=idempotent,
                keep=keep,
                after=after,
            )
        except BaseException:
            if ticket is not None:
                ticket.release(None)
            raise
        finally:
            slot.dropped()  # unless `_submit` stored it

    async def _submit(
        self,
        request: Request,
        ticket: Ticket | None,
        slot: Slot,
        timeout_s: float | None,
        *,
        subject: str,
        routed: bool,
        idempotent: bool,
        keep: bool,
        after: int,
    ) -> EventFeed:
        loop = asyncio.get_running_loop()
        if idempotent:
            accepted = await self._accepted(request.id)
            if accepted is not None:
                if accepted.fingerprint and accepted.fingerprint != fingerprint(request):
                    raise LlmbusError(
                        ErrorCode.BAD_REQUEST,
                        "this Idempotency-Key was used for a different request; use a new key",
                    )
                feed = await self._follow(request.id, accepted, after=after, cancel_on_close=not keep)
                feed.ticket = ticket
                observability.accepted(feed, request.model)
                return feed
        if self.inventory is not None and not routed:
            self.inventory.require(request.model)  # model_not_found (or "being pulled") at once
        payload = _encode(request)
        bus.check_payload(self.nc, len(payload))  # 413 naming NATS's limit, before anything is queued
        timeout = min(timeout_s or self.max_timeout_s, self.max_timeout_s)
        feed = EventFeed(self.nc, request.id, loop.time() + timeout, after=after, cancel_on_close=not keep)
        feed.ticket = ticket
        self._track(feed)
        await feed.subscribe()
        deadline_ms = int((time.time() + timeout) * 1000)
        hdrs = {
            headers.MSG_ID: request.id,
            headers.REPLY: subjects.event_subject(request.id),
            headers.DEADLINE: str(deadline_ms),
        }

        async def publish() -> PubAck:
            return await self.js.publish(subject, payload, headers=hdrs, timeout=2)

        try:
            with tracing.publish_span(subject, request.id, hdrs):
                # Retried through a leader election or a reconnect: safe, `Nats-Msg-Id` de-duplicates.
                ack = await with_backoff(
                    publish,
                    backoff=PUBLISH_BACKOFF,
                    retryable=lambda exc: isinstance(exc, _PUBLISH_ERRORS),
                    deadline=min(feed.deadline, loop.time() + PUBLISH_PATIENCE_S),
                )
        except _PUBLISH_ERRORS as exc:
            feed.finished = True
            feed.close()
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, "the request queue is unavailable", retry_after=1
            ) from exc
        observability.accepted(feed, request.model)
        if not ack.duplicate:
            slot.stored(ack.seq)
        if ack.duplicate:  # the same id inside the de-duplication window: it runs once, follow that run
            feed.replay = True
            return feed
        accepted = Accepted(
            request_id=request.id,
            model=request.model,
            deadline_ms=deadline_ms,
            fingerprint=fingerprint(request) if idempotent else "",
            tenant=self.admission.tenant_name() if self.admission is not None else "",
        )
        # Stored before the 202 (or the first event) goes out: the client's own follow or cancel,
        # on any edge, reads it from LLM_OUT at once.
        await self._record(accepted, deadline=min(feed.deadline, loop.time() + PUBLISH_PATIENCE_S))
        self._remember(accepted, feed.deadline)
        if routed and self.fallback is not None:
            assert isinstance(request, GenerateRequest)
            feed.guard = asyncio.create_task(self.fallback.guard(feed, request, hdrs, ack.seq))
        return feed

    async def _record(self, accepted: Accepted, *, deadline: float) -> None:
        async def publish() -> PubAck:
            hdrs = {headers.MSG_ID: f"{accepted.request_id}.accepted"}
            return await self.js.publish(subject, _encode(accepted), headers=hdrs, timeout=2)

        subject = subjects.accepted_subject(accepted.request_id)
        try:
            await with_backoff(
                publish,
                backoff=PUBLISH_BACKOFF,
                retryable=lambda exc: isinstance(exc, _PUBLISH_ERRORS),
                deadline=deadline,
            )
        except _PUBLISH_ERRORS as exc:  # it is queued and runs; only following it by id fails
            log.warning("request %s: could not store its `accepted` record: %r", accepted.request_id, exc)

    def detach(self, feed: EventFeed) -> None:
        """Lets a request run on without its client (`"stream": "deferred"`). Its feed is followed
        in the background only when it holds a tenant's in-flight slot, so the slot (and the tokens
        the answer used) is given back when the request ends, not when the client left."""
        if feed.ticket is None:
            feed.close()
            return

        async def follow() -> None:
            try:
                async for _ in feed.batches():
                    pass
            finally:
                feed.close()

        _in_background(follow())

    async def attach(self, request_id: str, *, after: int = -1) -> EventFeed:
        """A feed on a request accepted earlier (by any edge): stored events after `after`, then live.

        Closing it never cancels the request. Raises `not_found` for an id with no trace in LLM_OUT.
        """
        accepted = await self._accepted(request_id)
        self._check_owner(request_id, accepted)
        if accepted is None and not await self._has_events(request_id):
            raise LlmbusError(ErrorCode.NOT_FOUND, f"no request {request_id} (or it ended too long ago)")
        return await self._follow(request_id, accepted, after=after, cancel_on_close=False)

    async def cancel(self, request_id: str) -> bool:
        """Asks workers to stop the request; False when it has already ended.

        Raises `not_found` for an id with no trace in LLM_OUT.
        """
        accepted = await self._accepted(request_id)
        self._check_owner(request_id, accepted)
        last = await self._last_event(request_id)
        if accepted is None and last is None:
            raise LlmbusError(ErrorCode.NOT_FOUND, f"no request {request_id} (or it ended too long ago)")
        if last is not None and _decode_head(last).type in TERMINAL_TYPES:
            return False
        await self.nc.publish(subjects.cancel_subject(request_id))
        return True

    def _check_owner(self, request_id: str, accepted: Accepted | None) -> None:
        """Another tenant's request looks exactly like one that does not exist."""
        if self.admission is not None and not self.admission.owns(accepted):
            raise LlmbusError(ErrorCode.NOT_FOUND, f"no request {request_id} (or it ended too long ago)")

    async def _follow(
        self, request_id: str, accepted: Accepted | None, *, after: int, cancel_on_close: bool
    ) -> EventFeed:
        loop = asyncio.get_running_loop()
        now = time.time()
        # The request's own deadline (the feed waits a grace past it for the terminal event).
        end = accepted.deadline_ms / 1000 if accepted is not None else now + self.max_timeout_s
        deadline = loop.time() + max(end - now, 0.0)
        feed = EventFeed(
            self.nc, request_id, deadline, after=after, replay=True, cancel_on_close=cancel_on_close
        )
        self._track(feed)
        await feed.subscribe()
        await feed.prefetch()  # what is stored: a resume at or past the end is answered at once
        return feed

    async def _accepted(self, request_id: str) -> Accepted | None:
        try:
            data = await events.last(self.nc, subjects.accepted_subject(request_id))
        except _STORE_ERRORS as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, "the event store is unavailable", retry_after=1
            ) from exc
        if data is None:
            return None
        try:
            return _decode_accepted(data)
        except msgspec.DecodeError:
            return None

    async def _last_event(self, request_id: str) -> bytes | None:
        try:
            return await events.last(self.nc, subjects.event_subject(request_id))
        except _STORE_ERRORS as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, "the event store is unavailable", retry_after=1
            ) from exc

    async def _has_events(self, request_id: str) -> bool:
        return await self._last_event(request_id) is not None
