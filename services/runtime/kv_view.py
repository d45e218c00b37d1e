"""A NATS KV bucket mirrored in memory by a watch: the inventory of models, the tenants' spend.

One loop follows the watch; a view says how to open its bucket and what a put or a delete does.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue


class KVView:
    """Subclasses give `open` (the bucket) and `put` / `delete` (what an entry's change does)."""

    def __init__(self) -> None:
        self.synced = asyncio.Event()  # the initial values have arrived
        self._task: asyncio.Task[None] | None = None

    async def open(self, js: JetStreamContext) -> KeyValue:
        raise NotImplementedError

    def put(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    async def start(self, js: JetStreamContext) -> Self:
        self._watcher = await (await self.open(js)).watchall()
        self._task = asyncio.create_task(self._follow())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            with contextlib.suppress(Exception):
                await self._watcher.stop()  # type: ignore[no-untyped-call]

    async def _follow(self) -> None:
        async for entry in self._watcher:
            if entry is None:  # the watch has delivered every current value
                self.synced.set()
                continue
            self.delete(entry.key)
            if entry.operation not in (KV_DEL, KV_PURGE) and entry.value:
                self.put(entry.key, entry.value)
