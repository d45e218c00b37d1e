"""Which models can serve a request right now, so a route never sends one to a missing model.

The janitor's inventory (`services.runtime.inventory.InventoryView`, a watch of the KV bucket
`llm_models`) once a janitor has written it; until then the backend's own model list, asked at most
once per `ttl_s`. `None` means "unknown" (the backend cannot be reached): nothing is filtered then,
and the generator reports the real error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext

from contracts import LlmbusError
from contracts.models import canonical_model
from services.runtime.inventory import InventoryView

log = logging.getLogger(__name__)

ListModels = Callable[[], Awaitable[list[str]]]


class Inventory:
    def __init__(
        self,
        js: JetStreamContext,
        list_models: ListModels,
        ttl_s: float = 5.0,
        view: InventoryView | None = None,  # one already followed (the edge's); else its own
    ) -> None:
        self.js = js
        self._list_models = list_models
        self.ttl_s = ttl_s
        self._owns_view = view is None
        self.view = view if view is not None else InventoryView()
        self._listed: frozenset[str] | None = None
        self._listed_at = float("-inf")
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self._owns_view:
            await self.view.start(self.js)

    async def stop(self) -> None:
        if self._owns_view:
            await self.view.stop()

    async def available(self) -> frozenset[str] | None:
        """Canonical names of the models that can serve now, or None when unknown."""
        if self.view.populated:
            return frozenset(canonical_model(i.model) for i in self.view.entries.values() if i.ready)
        if time.monotonic() - self._listed_at < self.ttl_s:
            return self._listed
        async with self._lock:
            if time.monotonic() - self._listed_at >= self.ttl_s:
                try:
                    names = await asyncio.wait_for(self._list_models(), 3.0)
                    self._listed = frozenset(canonical_model(n) for n in names)
                except (LlmbusError, TimeoutError) as exc:
                    log.warning("model list unavailable, routes are not filtered: %s", exc)
                    self._listed = None
                self._listed_at = time.monotonic()
        return self._listed
