"""`queued` events while a streamed request waits for a generator (before its first event).

A looker task asks for the request's place `FIRST_LOOK_S` after it was queued (a request a free
generator takes at once costs no look), then every `REFRESH_S` until JetStream says a generator
has it; each answer wakes the feed (`EventFeed.wake`), so the relay writes it from its own task,
the one that iterates the feed (whose deadline timer belongs to that task). The first event of
the request (`start`, or an error) ends the looking. Looks are shared by every waiting request of
this edge (`services/runtime/queue_stats.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from contracts.queue import Queued
from services.runtime.events import RawEvent
from services.runtime.queue_stats import Waiting

log = logging.getLogger(__name__)

FIRST_LOOK_S = 0.25
REFRESH_S = 1.5  # under the 2 s promised, with a look's own time


async def while_queued(source: Any, shows_queue: bool) -> AsyncIterator[list[RawEvent] | Queued]:
    """`source.batches()`, with `Queued` items before the first batch while the request waits."""
    batches = source.batches()
    waiting: Waiting | None = getattr(source, "waiting", None) if shows_queue else None
    if waiting is None:
        async for batch in batches:
            yield batch
        return
    said: list[Queued] = []
    looker = _Looker(waiting, source, said)
    try:
        async for batch in batches:
            if batch:
                looker.stop()
                yield batch
                break
            if said:  # woken by the looker
                yield said[-1]
                said.clear()
        async for batch in batches:
            if batch:
                yield batch
    finally:
        await looker.aclose()


class _Looker:
    """The looking, begun `FIRST_LOOK_S` after the request was queued: a timer until then, and a
    task only for a request that is still waiting (most start at once: no task, no cancellation)."""

    def __init__(self, waiting: Waiting, source: Any, said: list[Queued]) -> None:
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            FIRST_LOOK_S, self._begin, waiting, source, said
        )

    def _begin(self, waiting: Waiting, source: Any, said: list[Queued]) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(_look(waiting, source, said))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        self.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _look(waiting: Waiting, source: Any, said: list[Queued]) -> None:
    while True:
        try:
            status = await waiting.look()
        except Exception as exc:  # a look that fails is skipped; the stream goes on
            log.debug("queue look failed: %r", exc)
        else:
            if status is None:  # a generator has it: its `start` follows
                return
            said.append(status)
            source.wake()
        await asyncio.sleep(REFRESH_S)
