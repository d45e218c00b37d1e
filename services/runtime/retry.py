"""Bounded exponential backoff: the one retry loop of the runtime.

Used where a failure is worth retrying only while nothing has been sent on (a model server that
refuses the connection, answers 5xx or sends no first token). Every wait is bounded: by the number
of retries, by the cap of one delay, and by the caller's deadline.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

from services.runtime.settings import Settings

T = TypeVar("T")


class Backoff(msgspec.Struct, frozen=True):
    retries: int = 3  # attempts after the first
    base_s: float = 0.25  # first delay; doubles each retry ...
    max_s: float = 5.0  # ... up to this

    @classmethod
    def from_settings(cls, settings: Settings) -> Backoff:
        return cls(
            retries=settings.backend_retries,
            base_s=settings.backend_retry_base_s,
            max_s=settings.backend_retry_max_s,
        )

    def delay(self, retry: int) -> float:
        """Delay before retry `retry` (0-based): exponential, capped, with jitter in [50%, 100%]."""
        full: float = min(self.max_s, self.base_s * 2**retry)
        return full * (0.5 + random.random() / 2)  # jitter spreads retries of many requests


async def with_backoff(
    op: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    retryable: Callable[[Exception], bool],
    deadline: float | None = None,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """`await op()`, retried after a `retryable` failure; the last failure is raised.

    `deadline` is event-loop time: no retry is started whose delay would end after it.
    `on_retry(failure, delay)` is told of each retry before its wait (to log it).
    """
    loop = asyncio.get_running_loop()
    retry = 0
    while True:
        try:
            return await op()
        except Exception as exc:
            if retry >= backoff.retries or not retryable(exc):
                raise
            delay = backoff.delay(retry)
            if deadline is not None and loop.time() + delay >= deadline:
                raise
            retry += 1
            if on_retry is not None:
                on_retry(exc, delay)
            await asyncio.sleep(delay)
