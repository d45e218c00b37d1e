"""Non-streaming answers still notice a client that hangs up, and stop the work upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from litestar import Request

T = TypeVar("T")


class Closable(Protocol):
    """An `EventFeed`, or anything that stops the work upstream when closed."""

    def close(self) -> None: ...


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def unless_client_leaves(
    request: Request[Any, Any, Any], feed: Closable, work: Awaitable[T], *, close: bool = True
) -> T:
    """Awaits `work` (which reads `feed`); if the client hangs up first, cancels it and the request.
    The feed is closed then, and when `work` is done unless `close` is false (a stream goes on).

    The body has been read, so the next ASGI message can only be `http.disconnect`.
    """
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if close or not task.done():
            feed.close()
    if not task.done():
        task.cancel()
        raise ClientGone
    return task.result()
