"""The events of one request, in order, as the edge relays them: its `EventFeed`.

A feed follows `llm.out.<id>` live (a core subscription made before the request is published, so
nothing is missed) and falls back on the copy in `LLM_OUT` whenever the live path cannot be
trusted: to replay a request it attaches to (resume, an idempotent retry), to fill a gap in the
numbering (the edge's NATS connection dropped for a moment) and when it has heard nothing for a
while. Every event passes one `Sequencer`, so the client gets each `seq` once and in order. The
terminal event becomes the feed's `Outcome`, which everything after the relay reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError

from contracts import TERMINAL_TYPES, Error, ErrorCode, EventHead, headers, subjects
from services.edge.outcome import Outcome
from services.runtime import direct_sub, events
from services.runtime.events import RawEvent, Sequencer
from services.runtime.queue_stats import Waiting
from services.runtime.retry import Backoff

__all__ = ["EventFeed", "Outcome", "RawEvent"]

_encode = msgspec.json.Encoder().encode
_decode_head = msgspec.json.Decoder(EventHead).decode


class _Routed(msgspec.Struct):
    model: str
    route: str = ""


_decode_routed = msgspec.json.Decoder(_Routed).decode

# A gap in the numbering is waited for this long (a worker that reconnected, or saw the event
# stream's leader change, republishes what did not make it), then filled from LLM_OUT or skipped.
GAP_WAIT_S = 5.0
# After its deadline a feed waits this long for the worker's own terminal event (a worker stops a
# running request at the same deadline) before the edge ends the request itself (`_end_at_deadline`).
TERMINAL_GRACE_S = 2.0
# A feed that hears nothing looks at LLM_OUT after this long, then less and less often.
IDLE_PROBE_S = 2.0
IDLE_PROBE_MAX_S = 30.0
STORE_ERRORS = (NatsTimeoutError, NoRespondersError, TimeoutError, OSError)
PUBLISH_ERRORS = (NoStreamResponseError, NoRespondersError, NatsTimeoutError, TimeoutError)
# How the edge retries a publish JetStream must acknowledge (a request, its `accepted` record), and
# how long it keeps trying before it answers 503.
PUBLISH_BACKOFF = Backoff(retries=6, base_s=0.2, max_s=2.0)
PUBLISH_PATIENCE_S = 6.0


class Hold(Protocol):
    """A tenant's ticket (services/edge/admission.py): given back once, with the tokens used."""

    def give_back(self, tokens: int) -> None: ...


class Cancellable(Protocol):
    """A routed request's fallback wait (services/edge/routing.py), stopped with the feed."""

    def cancel(self) -> Any: ...


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

    def wake(self) -> None:
        """Ends the current wait with nothing taken (`EventFeed.wake`)."""
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
        ticket: Hold | None = None,
        guard: Cancellable | None = None,
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
        self._guard = guard  # a routed request's bounded wait for it (services/edge/routing.py)
        self._ticket = ticket  # its hold on the tenant's limits, given back on close
        self.outcome: Outcome | None = None  # its terminal event, once delivered
        self.first_token_at: float | None = None  # perf_counter() when the first token was delivered
        self.routed: _Routed | None = None  # a routed request's model that answers, and its route
        self._sub: Any = None
        self._replayed: list[RawEvent] | None = None  # read by `prefetch`, not yet delivered
        self.waiting: Waiting | None = None  # where it waits in LLM_REQ (set by the dispatcher)
        self._woken = False

    async def subscribe(self) -> None:
        first = self.first_event
        inbox = self._inbox

        def put(msg: Msg) -> None:
            inbox.put(msg)
            if not first.is_set():
                first.set()

        self._sub, _ = await direct_sub.subscribe(self._nc, self.subject, put)

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
        loop = asyncio.get_running_loop()
        # The deadline (plus the grace) bounds each wait, rather than an `asyncio.timeout` around the
        # loop: that cancels the task that entered it, and a stream's first events may be read by
        # the handler's task (its status waits for them) and the rest by the relay's.
        end = self.deadline + TERMINAL_GRACE_S
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
            remaining = end - loop.time()
            if remaining <= 0:
                break
            out = []
            items = await inbox.take(min(GAP_WAIT_S if sequencer.gap else idle, remaining))
            if not items and self._woken:  # `wake`: the relay has something to say
                self._woken = False
                yield []
                continue
            if not items:  # this wait's own bound ran out (or the deadline: the loop's test)
                if loop.time() >= end:
                    break
                if sequencer.gap:
                    out = await self._backfill()
                    sequencer.skip_gap(out)  # never wait for an event the bus lost
                elif await self._stored_newer():
                    out = await self._backfill()
                idle = min(idle * 2, IDLE_PROBE_MAX_S)
            else:
                idle = IDLE_PROBE_S
                out = await self._ordered(items)
            if out:
                yield self._seen(out)
        if not self.finished:  # the deadline passed without a terminal event
            self.cancel()
            out = await self._end_at_deadline()
            self.finished = True
            if out:
                yield self._seen(out)

    async def _ordered(self, items: list[Msg | None]) -> list[RawEvent]:
        """The delivered events in order, through the sequencer; a poke (None) adds LLM_OUT's."""
        out: list[RawEvent] = []
        poked = False
        for msg in items:
            if msg is None:
                poked = True
            else:
                self._sequencer.offer(_decode_head(msg.data), msg.data, out)
        if poked:  # the edge reconnected: events may have passed it by
            out += await self._backfill()
        return out

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
        with contextlib.suppress(*STORE_ERRORS, *PUBLISH_ERRORS):
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
            head, data = out[-1]
            if head.type in TERMINAL_TYPES:
                self.outcome = Outcome(head.type, data)
        if self.first_token_at is None and any(head.type == "token" for head, _ in out):
            self.first_token_at = time.perf_counter()
        for head, data in out:
            if head.type == "routed":  # logs and metrics name this model, never `auto`
                self.routed = _decode_routed(data)
        return out

    async def _backfill(self) -> list[RawEvent]:
        """What LLM_OUT holds that this feed has not delivered yet, in order."""
        out: list[RawEvent] = []
        with contextlib.suppress(*STORE_ERRORS):
            for head, data in await events.read(self._nc, self.subject, wait=2.0):
                self._sequencer.offer(head, data, out)
        return out

    async def _stored_newer(self) -> bool:
        """Whether LLM_OUT has an event this feed has not seen (its live delivery was lost)."""
        try:
            data = await events.last(self._nc, self.subject)
        except STORE_ERRORS:
            return False
        if data is None:
            return False
        head = _decode_head(data)
        return head.seq >= self._sequencer.next or head.type in TERMINAL_TYPES

    @property
    def holds_ticket(self) -> bool:
        return self._ticket is not None

    def wake(self) -> None:
        """Makes `batches` yield an empty batch now if it is waiting (services/edge/waiting.py:
        a `queued` status goes out from the relay's own task, which iterates the feed)."""
        self._woken = True
        self._inbox.wake()

    def poke(self) -> None:
        """Makes the feed look at LLM_OUT now (its live subscription may have missed events)."""
        self._inbox.put(None)

    def cancel(self) -> None:
        """Asks workers to stop this request."""
        in_background(self._nc.publish(subjects.cancel_subject(self.request_id)))

    def close(self) -> None:
        """Cancels upstream unless the request ended (or outlives its client), and unsubscribes.

        It does not await, so it is safe in the `finally` of a task being cancelled (a client that
        hung up): the work is handed to background tasks.
        """
        if not self.finished and self.cancel_on_close:
            self.cancel()
        if self._guard is not None:
            self._guard.cancel()
        if self._ticket is not None:
            ticket, self._ticket = self._ticket, None
            ticket.give_back(self.outcome.tokens if self.outcome is not None else 0)
        if self._sub is not None:
            # Dropped here: the subscription's task holds the request's context, which holds this
            # feed; without the cycle a finished request is freed at once, not by a full collection.
            in_background(self._sub.unsubscribe())
            self._sub = None


_background: set[asyncio.Task[None]] = set()


def in_background(coro: Coroutine[Any, Any, None]) -> None:
    async def quietly() -> None:
        with contextlib.suppress(Exception):
            await coro

    task = asyncio.get_running_loop().create_task(quietly())
    _background.add(task)
    task.add_done_callback(_background.discard)
