"""Publishing a request onto JetStream and opening its event feed: the edge's whole bus side.

`submit` admits the request (the tenant's limits, services/edge/admission.py), persists it and
returns its `EventFeed` (services/edge/feed.py), subscribed before publishing; `attach` and
`cancel` act on a request accepted earlier, by any edge. The HTTP layer hears of an accepted
request only through the `on_accepted` hook it passes in: nothing here imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.js.api import PubAck
from nats.js.errors import APIError, BadRequestError

from contracts import (
    TERMINAL_TYPES,
    Accepted,
    EmbedRequest,
    ErrorCode,
    EventHead,
    GenerateRequest,
    LlmbusError,
    headers,
    subjects,
)
from contracts.route import ROUTE_SUBJECT, is_routed
from contracts.usage import Origin
from services.edge.accepted import AcceptedRecords, fingerprint
from services.edge.admission import Admission, Ticket
from services.edge.backlog import Slot
from services.edge.feed import (
    PUBLISH_BACKOFF,
    PUBLISH_ERRORS,
    PUBLISH_PATIENCE_S,
    STORE_ERRORS,
    EventFeed,
    in_background,
)
from services.edge.routing import RouteFallback, RouteGuard
from services.edge.tenants import ANONYMOUS, Tenant
from services.runtime import bus, events, queue_stats, tracing, usage
from services.runtime.inventory import InventoryView
from services.runtime.queue_stats import Waiting
from services.runtime.retry import with_backoff

__all__ = ["Dispatcher", "EventFeed"]

log = logging.getLogger("llmbus.edge")

_encode = msgspec.json.Encoder().encode
_decode_head = msgspec.json.Decoder(EventHead).decode

# JetStream's error code for a message over the stream's `max_msg_size`.
MESSAGE_TOO_LARGE = 10054

Request = GenerateRequest | EmbedRequest
# Told of every request the bus accepted, with the model asked for (the HTTP layer's metrics).
OnAccepted = Callable[[EventFeed, str], None]


class Dispatcher:
    def __init__(
        self,
        nc: Client,
        *,
        max_timeout_s: float,
        fallback: RouteFallback | None = None,
        inventory: InventoryView | None = None,
        admission: Admission | None = None,
        on_accepted: OnAccepted | None = None,
        provision: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.nc = nc
        self.on_accepted = on_accepted
        self._provision = provision  # what the edge owns on the bus, re-created after a reconnect
        self.admission = admission  # every route's requests pass it before publishing
        self.js = nc.jetstream()
        self.max_timeout_s = max_timeout_s
        self.fallback = fallback
        self.inventory = inventory  # the janitors' models: refuse one no host has, before queueing
        self._feeds: weakref.WeakSet[EventFeed] = weakref.WeakSet()
        self.records = AcceptedRecords(nc)
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
            await self.records.store_again(PUBLISH_PATIENCE_S)
        finally:
            for feed in list(self._feeds):
                if not feed.finished:
                    feed.poke()

    async def submit(
        self,
        request: Request,
        timeout_s: float | None = None,
        *,
        subject: str = "",
        tenant: Tenant = ANONYMOUS,
        origin: Origin | None = None,
        idempotent: bool = False,
        detached: bool = False,
        after: int = -1,
    ) -> EventFeed:
        """Persists the request on JetStream; returns its event feed, subscribed before publishing.

        `subject` defaults to the request's generate subject (`llm.req.generate.<model>`).
        `idempotent`: the id came from an `Idempotency-Key`; if that request was accepted before
        (same content), the feed attaches to it instead of running it again, replaying after
        `after`. `detached`: the request outlives the feed (closing it does not cancel). `tenant`:
        who asks (services/edge/auth.py), whose limits and models apply; `origin`: its key and API,
        sent along for the ledger's row.
        """
        if timeout_s is not None and not timeout_s > 0:  # the compat APIs pass theirs unchecked
            raise LlmbusError(ErrorCode.BAD_REQUEST, "`timeout` must be a positive number of seconds")
        keep = idempotent or detached
        routed = isinstance(request, GenerateRequest) and is_routed(request.model)  # "auto", "route:x"
        subject = subject or (ROUTE_SUBJECT if routed else subjects.generate_subject(request.model))
        ticket = None
        slot = Slot(None, subject)
        if self.admission is not None:
            request, ticket, slot = await self.admission.admit(request, subject, tenant)
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
                tenant=tenant.name,
                origin=origin or Origin(tenant=tenant.name),
            )
        except BaseException:
            if ticket is not None:
                ticket.give_back(0)
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
        tenant: str,
        origin: Origin,
    ) -> EventFeed:
        loop = asyncio.get_running_loop()
        if idempotent:
            accepted = await self.records.read(request.id)
            if accepted is not None:
                if accepted.fingerprint and accepted.fingerprint != fingerprint(request):
                    raise LlmbusError(
                        ErrorCode.BAD_REQUEST,
                        "this Idempotency-Key was used for a different request; use a new key",
                    )
                feed = await self._follow(
                    request.id, accepted, after=after, cancel_on_close=not keep, ticket=ticket
                )
                self._accepted_hook(feed, request.model)
                return feed
        if self.inventory is not None and not routed:
            self.inventory.require(request.model)  # model_not_found (or "being pulled") at once
        payload = _encode(request)
        bus.check_payload(self.nc, len(payload))  # 413 naming NATS's limit, before anything is queued
        timeout = min(timeout_s or self.max_timeout_s, self.max_timeout_s)
        deadline_ms = int((time.time() + timeout) * 1000)
        hdrs = {
            headers.MSG_ID: request.id,
            headers.REPLY: subjects.event_subject(request.id),
            headers.DEADLINE: str(deadline_ms),
            # Who asked (the ledger's row): the caller, the model it named, when it was accepted.
            headers.ORIGIN: usage.encode_origin(
                msgspec.structs.replace(origin, model=request.model, accepted_ms=int(time.time() * 1000))
            ),
        }
        guard = None
        if routed and self.fallback is not None:
            assert isinstance(request, GenerateRequest)
            guard = RouteGuard(self.fallback, request, hdrs)
        feed = EventFeed(
            self.nc,
            request.id,
            loop.time() + timeout,
            after=after,
            cancel_on_close=not keep,
            ticket=ticket,
            guard=guard,
        )
        self._track(feed)
        await feed.subscribe()

        accepted = Accepted(
            request_id=request.id,
            model=request.model,
            deadline_ms=deadline_ms,
            fingerprint=fingerprint(request) if idempotent else "",
            tenant=tenant,
        )
        patience = min(feed.deadline, loop.time() + PUBLISH_PATIENCE_S)
        # The `accepted` record is stored before the 202 (or the first event) goes out, so the
        # client's own follow or cancel, on any edge, reads it from LLM_OUT at once. It is sent
        # alongside the request, not after its ack: one round trip instead of two. Not for an
        # idempotent request: a retry with its key follows the record, so it must name a request
        # that was stored. (When the request cannot be stored, its caller gets 503 and a follower
        # of the orphan record `deadline_exceeded` at its deadline.)
        record = (
            None if idempotent else asyncio.ensure_future(self.records.store(accepted, deadline=patience))
        )
        try:
            ack = await self._publish(subject, payload, hdrs, deadline=patience)
        except BaseException:
            feed.finished = True
            feed.close()
            raise
        finally:
            if record is not None:
                await record  # never raises: a record that cannot be stored is only logged
        self._accepted_hook(feed, request.model)
        if not ack.duplicate:
            slot.stored(ack.seq)
            if subject.startswith(subjects.GENERATE_PREFIX):  # its place can be shown (`queued`)
                feed.waiting = Waiting(queue_stats.of(self.nc), subject, ack.seq)
        if ack.duplicate:  # the same id inside the de-duplication window: it runs once, follow that run
            feed.replay = True  # (its record, if sent again above, was de-duplicated too)
            return feed
        if record is None:
            await self.records.store(accepted, deadline=patience)
        self.records.keep(accepted, feed.deadline)
        if guard is not None:
            guard.start(feed, ack.seq)
        return feed

    async def _publish(
        self, subject: str, payload: bytes, hdrs: dict[str, str], *, deadline: float
    ) -> PubAck:
        """Stores the request in its queue; retried through a leader election or a reconnect
        (safe: `Nats-Msg-Id` de-duplicates)."""

        async def publish() -> PubAck:
            return await self.js.publish(subject, payload, headers=hdrs, timeout=2)

        try:
            with tracing.publish_span(subject, hdrs[headers.MSG_ID], hdrs):
                return await with_backoff(
                    publish,
                    backoff=PUBLISH_BACKOFF,
                    retryable=lambda exc: isinstance(exc, PUBLISH_ERRORS),
                    deadline=deadline,
                )
        except PUBLISH_ERRORS as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, "the request queue is unavailable", retry_after=1
            ) from exc
        except BadRequestError as exc:
            if exc.err_code != MESSAGE_TOO_LARGE:
                raise
            raise await self._too_large_for_stream(len(payload)) from None

    async def _too_large_for_stream(self, size: int) -> LlmbusError:
        """The request fits this edge's body limit but not the request stream's message limit
        (`max_msg_size`, set from the `LLMBUS_MAX_BODY_BYTES` of whichever service created it)."""
        limit = "its limit"
        with contextlib.suppress(*STORE_ERRORS, APIError):
            info = await self.js.stream_info(subjects.REQUEST_STREAM)
            limit = f"at most {info.config.max_msg_size} bytes"
        return LlmbusError(
            ErrorCode.REQUEST_TOO_LARGE,
            f"the request is {size} bytes on the bus; the request stream {subjects.REQUEST_STREAM} holds "
            f"{limit} (`llmbus provision` sizes it from LLMBUS_MAX_BODY_BYTES): send less per request",
        )

    def _accepted_hook(self, feed: EventFeed, model: str) -> None:
        if self.on_accepted is not None:
            self.on_accepted(feed, model)

    def detach(self, feed: EventFeed) -> None:
        """Lets a request run on without its client (`"stream": "deferred"`). Its feed is followed
        in the background only when it holds a tenant's in-flight slot, so the slot (and the tokens
        the answer used) is given back when the request ends, not when the client left."""
        if not feed.holds_ticket:
            feed.close()
            return

        async def follow() -> None:
            try:
                async for _ in feed.batches():
                    pass
            finally:
                feed.close()

        in_background(follow())

    async def attach(self, request_id: str, *, after: int = -1, tenant: Tenant = ANONYMOUS) -> EventFeed:
        """A feed on a request accepted earlier (by any edge): stored events after `after`, then live.

        Closing it never cancels the request. Raises `not_found` for an id with no trace in LLM_OUT.
        """
        accepted = await self.records.read(request_id)
        self._check_owner(request_id, accepted, tenant)
        if accepted is None and not await self._has_events(request_id):
            raise LlmbusError(ErrorCode.NOT_FOUND, f"no request {request_id} (or it ended too long ago)")
        return await self._follow(request_id, accepted, after=after, cancel_on_close=False)

    async def cancel(self, request_id: str, tenant: Tenant = ANONYMOUS) -> bool:
        """Asks workers to stop the request; False when it has already ended.

        Raises `not_found` for an id with no trace in LLM_OUT.
        """
        accepted = await self.records.read(request_id)
        self._check_owner(request_id, accepted, tenant)
        last = await self._last_event(request_id)
        if accepted is None and last is None:
            raise LlmbusError(ErrorCode.NOT_FOUND, f"no request {request_id} (or it ended too long ago)")
        if last is not None and _decode_head(last).type in TERMINAL_TYPES:
            return False
        await self.nc.publish(subjects.cancel_subject(request_id))
        return True

    def _check_owner(self, request_id: str, accepted: Accepted | None, tenant: Tenant) -> None:
        """Another tenant's request looks exactly like one that does not exist."""
        if self.admission is not None and not self.admission.owns(accepted, tenant):
            raise LlmbusError(ErrorCode.NOT_FOUND, f"no request {request_id} (or it ended too long ago)")

    async def _follow(
        self,
        request_id: str,
        accepted: Accepted | None,
        *,
        after: int,
        cancel_on_close: bool,
        ticket: Ticket | None = None,
    ) -> EventFeed:
        loop = asyncio.get_running_loop()
        now = time.time()
        # The request's own deadline (the feed waits a grace past it for the terminal event).
        end = accepted.deadline_ms / 1000 if accepted is not None else now + self.max_timeout_s
        deadline = loop.time() + max(end - now, 0.0)
        feed = EventFeed(
            self.nc,
            request_id,
            deadline,
            after=after,
            replay=True,
            cancel_on_close=cancel_on_close,
            ticket=ticket,
        )
        self._track(feed)
        await feed.subscribe()
        await feed.prefetch()  # what is stored: a resume at or past the end is answered at once
        return feed

    async def _last_event(self, request_id: str) -> bytes | None:
        try:
            return await events.last(self.nc, subjects.event_subject(request_id))
        except STORE_ERRORS as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, "the event store is unavailable", retry_after=1
            ) from exc

    async def _has_events(self, request_id: str) -> bool:
        return await self._last_event(request_id) is not None
