"""`queued` events while a streamed request waits for a generator (before its first event).

The relay asks for a look `FIRST_LOOK_S` after the request was queued (a request a free generator
takes at once costs no look), then every `REFRESH_S` until the request's first event (`start`,
or an error) arrives or JetStream says a generator has it. Looks are shared by every waiting
request of this edge (`services/runtime/queue_stats.py`).
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
    first: asyncio.Future[list[RawEvent]] = asyncio.ensure_future(anext(batches))
    try:
        wait = FIRST_LOOK_S
        while True:
            done, _ = await asyncio.wait({first}, timeout=wait)
            if done:
                break
            wait = REFRESH_S
            try:
                status = await waiting.look()
            except Exception as exc:  # a look that fails is skipped; the stream goes on
                log.debug("queue look failed: %r", exc)
                continue
            if status is None:  # a generator has it: its `start` follows
                break
            yield status
        try:
            batch = await first
        except StopAsyncIteration:
            return
        yield batch
        async for batch in batches:
            yield batch
    finally:
        if not first.done():
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await first
