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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

from contracts.queue import Queued
from services.runtime.events import RawEvent
from services.runtime.queue_stats import Waiting

log = logging.getLogger(__name__)

Items = AsyncIterator[list[RawEvent] | Queued]  # what a relay iterates (closed with `aclose`)

FIRST_LOOK_S = 0.25
REFRESH_S = 1.5  # under the 2 s promised, with a look's own time


def while_queued(source: Any, shows_queue: bool) -> Items:
    """`source.batches()`, with `Queued` items before the first batch while the request waits."""
    batches = source.batches()
    waiting: Waiting | None = getattr(source, "waiting", None) if shows_queue else None
    return batches if waiting is None else _WhileQueued(batches, _Looker(waiting, source))


class _WhileQueued:
    """The feed's batches with the looker's places until the first batch, then the batches alone:
    from there on `__anext__` hands out the feed's own awaitable (no frame of its own per batch).
    `aclose` stops the looking and closes the feed's iterator (the relay's `finally`)."""

    def __init__(self, batches: AsyncGenerator[list[RawEvent], None], looker: _Looker) -> None:
        self._batches = batches
        self._looker: _Looker | None = looker

    def __aiter__(self) -> _WhileQueued:
        return self

    def __anext__(self) -> Awaitable[list[RawEvent] | Queued]:
        if self._looker is None:
            return self._batches.__anext__()
        return self._waiting()

    async def _waiting(self) -> list[RawEvent] | Queued:
        looker = self._looker
        assert looker is not None
        while True:
            try:
                batch = await self._batches.__anext__()
            except BaseException:
                await self.aclose()
                raise
            if batch:
                looker.stop()
                self._looker = None
                return batch
            if looker.said:  # woken by the looker
                said = looker.said[-1]
                looker.said.clear()
                return said

    async def aclose(self) -> None:
        if self._looker is not None:
            looker, self._looker = self._looker, None
            await looker.aclose()
        await self._batches.aclose()


class _Looker:
    """The looking, begun `FIRST_LOOK_S` after the request was queued: a timer until then, and a
    task only for a request that is still waiting (most start at once: no task, no cancellation).
    Each place it learns is put in `said` and wakes the feed."""

    def __init__(self, waiting: Waiting, source: Any) -> None:
        self.said: list[Queued] = []
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            FIRST_LOOK_S, self._begin, waiting, source
        )

    def _begin(self, waiting: Waiting, source: Any) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(_look(waiting, source, self.said))

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
