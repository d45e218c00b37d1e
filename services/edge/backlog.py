"""How many requests wait or run per request subject, to refuse overload before it queues.

`LLM_REQ` is a work-queue stream: a request stays in it until a worker acks its end, so the
stream's message count per subject (`llm.req.generate.<model>`, ...) is exactly the consumers'
`num_pending + num_ack_pending` for that model, for every model in one JetStream API call
(`STREAM.INFO` with a subject filter): a "look", which also says the stream's last sequence.

The edge's count for a subject is the look's, plus the requests it stored since (their publish
acknowledgement names a stream sequence after the look's last one), plus those being published.
So every request this edge queued is in it (drained ones only make it high), and one edge never
admits past the bound, however many requests arrive at once. Before it refuses a request, the edge
takes a look sent after that request arrived and waits (bounded) for its publishes in flight to be
acknowledged, so it never refuses on a view of a queue that has drained since, nor counts a
request twice. Looks are shared by concurrent requests; while requests arrive the edge also looks
in the background once per `LLMBUS_QUEUE_CHECK_S`, which is how it learns what other edges queued
(each edge counts only its own between two looks: see docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js import JetStreamContext

from contracts import ErrorCode, LlmbusError, subjects

log = logging.getLogger(__name__)

# What a client is told to wait when a queue is full (the seed's clients back off >= 2 s anyway).
QUEUE_FULL_RETRY_S = 2.0
LOOK_TIMEOUT_S = 2.0
# How long a request about to be refused waits for the publishes in flight to be acknowledged.
SETTLE_S = 1.0


class Slot:
    """One admitted request's place in the estimate until its publish ends (either way, once)."""

    __slots__ = ("backlog", "subject")

    def __init__(self, backlog: Backlog | None, subject: str) -> None:
        self.backlog = backlog
        self.subject = subject

    def stored(self, seq: int) -> None:
        """The request is in the stream at `seq` (its publish acknowledged, not as a duplicate)."""
        if self.backlog is not None:
            self.backlog._settle(self.subject, seq)
            self.backlog = None

    def dropped(self) -> None:
        """Nothing was queued for it (refused later, attached to an earlier run, or failed)."""
        if self.backlog is not None:
            self.backlog._settle(self.subject, None)
            self.backlog = None


class Backlog:
    def __init__(self, js: JetStreamContext, bound: int, max_age_s: float) -> None:
        self.js = js
        self.bound = bound
        self.max_age_s = max_age_s
        self._counts: dict[str, int] = {}  # subject -> stored requests at the last look
        self._last_seq = 0  # the stream's last sequence at the last look
        self._landed: dict[str, list[int]] = {}  # subject -> sequences this edge stored after it
        self._pending: dict[str, int] = {}  # subject -> admitted, publish not ended yet
        self._settled = asyncio.Event()  # set whenever a publish ends
        self._at = float("-inf")  # monotonic time the last answered look was sent
        self._look: asyncio.Task[None] | None = None
        self._look_sent = float("-inf")  # monotonic time the look in flight was sent

    def estimate(self, subject: str) -> int:
        """Requests queued or running on `subject`, never fewer than this edge queued there."""
        return self._known(subject) + self._pending.get(subject, 0)

    def _known(self, subject: str) -> int:
        return self._counts.get(subject, 0) + len(self._landed.get(subject, ()))

    async def admit(self, subject: str) -> Slot:
        """A slot for one more request on `subject`; raises `queue_full` when it holds `bound`."""
        if self.bound <= 0:
            return Slot(None, subject)
        arrived = time.monotonic()
        if arrived - self._at > self.max_age_s and (self._look is None or self._look.done()):
            self._start_look()  # in the background: keeps the view fresh while requests arrive
        if self.estimate(subject) >= self.bound:
            await self._look_after(arrived)  # refuse only on what the stream holds now
            await self._settle_pending(subject)  # ... and count each request once
            waiting = self.estimate(subject)
            if waiting >= self.bound:
                raise LlmbusError(
                    ErrorCode.QUEUE_FULL,
                    f"{waiting} requests are queued or running for "
                    f"{subjects.model_from_subject(subject)!r} (the bound is {self.bound}); retry later",
                    retry_after=QUEUE_FULL_RETRY_S,
                )
        self._pending[subject] = self._pending.get(subject, 0) + 1
        return Slot(self, subject)

    def _settle(self, subject: str, seq: int | None) -> None:
        self._pending[subject] -= 1
        if seq is not None and seq > self._last_seq:  # not in the last look's count
            self._landed.setdefault(subject, []).append(seq)
        self._settled.set()

    async def _settle_pending(self, subject: str) -> None:
        """Waits up to `SETTLE_S` until no publish on `subject` is in flight: each one is then
        known to be in the look's count or after it, not maybe both."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_S):
                while self._known(subject) < self.bound <= self.estimate(subject):
                    self._settled.clear()
                    await self._settled.wait()

    async def prime(self) -> None:
        """Looks once now (at start)."""
        await self._start_look()

    async def _look_after(self, arrived: float) -> None:
        """Returns once a look sent after `arrived` has answered (joining one in flight)."""
        while True:
            task = self._look
            if task is None or task.done():
                task = self._start_look()
            sent = self._look_sent
            await asyncio.shield(task)
            if sent >= arrived:
                return

    def _start_look(self) -> asyncio.Task[None]:
        self._look_sent = time.monotonic()
        self._look = asyncio.get_running_loop().create_task(self._take_look(self._look_sent))
        return self._look

    async def _take_look(self, sent: float) -> None:
        try:
            async with asyncio.timeout(LOOK_TIMEOUT_S):
                info = await self.js.stream_info(
                    subjects.REQUEST_STREAM, subjects_filter=subjects.REQUEST_SUBJECTS
                )
        except Exception as exc:  # keep the last view (only ever too high); the next request looks again
            log.debug("could not read the request backlog: %s", exc)
            return
        if sent > self._at:  # a look sent later may have answered first: keep the newest
            self._counts = dict(info.state.subjects or {})
            self._last_seq = last = info.state.last_seq
            self._landed = {subject: [s for s in seqs if s > last] for subject, seqs in self._landed.items()}
            self._at = sent

    async def stop(self) -> None:
        if self._look is not None:
            self._look.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._look
