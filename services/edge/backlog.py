"""How many requests wait or run per request subject, to refuse overload before it queues.

`LLM_REQ` is a work-queue stream: a request stays in it until a worker acks its end, so the
stream's message count per subject (`llm.req.generate.<model>`, ...) is exactly the consumers'
`num_pending + num_ack_pending` for that model, for every model in one JetStream API call
(`STREAM.INFO` with a subject filter). The edge makes that call at most once per
`LLMBUS_QUEUE_CHECK_S`, in the background and only while requests arrive, and adds the requests it
published since, so a burst between two looks is still counted.
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


class Backlog:
    def __init__(self, js: JetStreamContext, bound: int, max_age_s: float) -> None:
        self.js = js
        self.bound = bound
        self.max_age_s = max_age_s
        self._counts: dict[str, int] = {}  # subject -> stored requests at the last look
        self._since: dict[str, int] = {}  # subject -> requests this edge published since
        self._at = 0.0  # monotonic time of the last look
        self._refresh: asyncio.Task[None] | None = None

    def check(self, subject: str) -> None:
        """Raises `queue_full` when `subject` holds `bound` requests or more; else counts one more."""
        if self.bound <= 0:
            return
        if time.monotonic() - self._at > self.max_age_s and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._look())
        waiting = self._counts.get(subject, 0) + self._since.get(subject, 0)
        if waiting >= self.bound:
            raise LlmbusError(
                ErrorCode.QUEUE_FULL,
                f"{waiting} requests are queued or running for {subjects.model_from_subject(subject)!r} "
                f"(the bound is {self.bound}); retry later",
                retry_after=QUEUE_FULL_RETRY_S,
            )
        self._since[subject] = self._since.get(subject, 0) + 1

    async def prime(self) -> None:
        """Looks once now (at start, and in tests that need an exact view)."""
        await self._look()

    async def _look(self) -> None:
        try:
            info = await self.js.stream_info(
                subjects.REQUEST_STREAM, subjects_filter=subjects.REQUEST_SUBJECTS
            )
        except Exception as exc:  # keep the last view; the next request looks again
            log.debug("could not read the request backlog: %s", exc)
            return
        self._counts = dict(info.state.subjects or {})
        self._since = {}
        self._at = time.monotonic()

    async def stop(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
