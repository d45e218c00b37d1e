"""A core subscription that hands each message to a plain function, with no task of its own.

nats-py runs a subscription's callback in a task of the subscription's: every message is put on an
`asyncio.Queue`, that task wakes, takes it and awaits the callback. For the edge's per-request
event feeds (one subscription per stream in flight, one message per token) that is a queue put,
a queue get, a future and a task switch per token (measured: 1-3 % of the edge's CPU,
docs/benchmarks.md). Here nats-py's read loop calls `deliver(msg)` itself, which must be quick
and must not raise (the feed appends to a list and wakes its reader).

It relies on one nats-py detail: its read loop hands a subscription's messages to
`sub._pending_queue.put_nowait`. A nats-py without it gets the callback subscription instead
(`direct` is False), which behaves the same, a task switch dearer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


class _Handoff:
    """Stands in for the subscription's queue: what is put is delivered at once."""

    __slots__ = ("_deliver",)

    def __init__(self, deliver: Callable[[Msg], None]) -> None:
        self._deliver = deliver

    def put_nowait(self, msg: Msg) -> None:
        self._deliver(msg)

    # What nats-py asks of a subscription's queue besides `put_nowait` (unsubscribe, drain, stats).
    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    async def join(self) -> None:
        return None


def _usable(sub: Subscription) -> bool:
    return isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue) and hasattr(sub, "_pending_size")


async def subscribe(nc: Client, subject: str, deliver: Callable[[Msg], None]) -> tuple[Subscription, bool]:
    """Subscribes to `subject`, calling `deliver(msg)` from the read loop for each message.

    Returns the subscription and whether delivery is direct (else through nats-py's callback task).
    """
    # No pending limit: nothing is pending, each message is handed over as it is read.
    sub = await nc.subscribe(subject, pending_bytes_limit=0)
    if _usable(sub):
        queued, sub._pending_queue = sub._pending_queue, _Handoff(deliver)  # type: ignore[assignment]
        while not queued.empty():  # read while `subscribe` awaited its flush
            deliver(queued.get_nowait())
        return sub, True
    await sub.unsubscribe()

    async def cb(msg: Msg) -> None:
        deliver(msg)

    return await nc.subscribe(subject, cb=cb), False
