"""The edge's side of routing: a bounded wait for the classifier, then the default route's model.

A request with `"model": "auto"` (or `"route:NAME"`) goes to `llm.req.route`. If no event of it
arrives within `LLMBUS_ROUTE_WAIT_S` (no classifier running, or one too slow), the edge claims the
request (`services.runtime.handoff.Claims`: a classifier that answers later drops it), deletes the
routing message from the queue (a classifier that starts later never sees it), and routes it
itself: `start` and a `routed` event with method `edge_fallback`, then the request to the default
route's model, or, when that one is not available, the first of its fallbacks that is (walked as
the classifier walks them: `available_model`). The client sees the same start, routed, token...,
done either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from nats.aio.client import Client

from contracts import Error, ErrorCode, GenerateRequest, LlmbusError, Start, headers, subjects
from contracts.route import Routed
from services.classifier.inventory import Inventory
from services.classifier.router import available_model
from services.classifier.routes import RouteTable
from services.edge.feed import EventFeed
from services.runtime.backends import OpenAIBackend, create_backend
from services.runtime.backends.ollama_admin import OllamaAdmin
from services.runtime.handoff import Claims, republish
from services.runtime.inventory import InventoryView
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.edge")

_encode = msgspec.json.Encoder().encode

OWNER = "edge"


class RouteGuard:
    """A routed request's bounded wait, made with its feed and started once the request is queued;
    the feed cancels it when it closes."""

    __slots__ = ("_fallback", "_headers", "_request", "_task")

    def __init__(self, fallback: RouteFallback, request: GenerateRequest, hdrs: dict[str, str]) -> None:
        self._fallback = fallback
        self._request = request
        self._headers = hdrs
        self._task: asyncio.Task[None] | None = None

    def start(self, feed: EventFeed, queued: int) -> None:
        """`queued`: the routing message's sequence in the request stream (deleted on fallback)."""
        self._task = asyncio.create_task(self._fallback.guard(feed, self._request, self._headers, queued))

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class RouteFallback:
    def __init__(self, nc: Client, settings: Settings, inventory: InventoryView) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.wait_s = settings.route_wait_s
        self.table = RouteTable(settings.routes_file)
        self.claims = Claims(self.js, ttl_s=settings.dedupe_window_s)
        # Which models can serve now: the janitors' inventory, else the backend's list (as the
        # classifier knows it), asked only when a fallback happens.
        if settings.backend == "openai":
            backend = create_backend(settings)
            assert isinstance(backend, OpenAIBackend)
            self._close = backend.aclose
            self.available = Inventory(self.js, backend.models, view=inventory)
        else:
            admin = OllamaAdmin(settings.generate_url, connect_timeout=2.0)
            self._close = admin.aclose

            async def tags() -> list[str]:
                return [tag.name for tag in await admin.tags()]

            self.available = Inventory(self.js, tags, view=inventory)

    def route_cache_mode(self, name: str) -> str:
        """A route's response cache mode from the routes file ("": the route sets none)."""
        try:
            route = self.table.current().by_name(name)
        except LlmbusError:  # no usable routes file: the request fails where it is routed
            return ""
        return route.cache if route is not None else ""

    async def close(self) -> None:
        await self._close()

    async def guard(
        self, feed: EventFeed, request: GenerateRequest, hdrs: dict[str, str], queued: int
    ) -> None:
        """Waits for the classifier's first event; without one in time, routes the request itself."""
        try:
            async with asyncio.timeout(self.wait_s):
                await feed.first_event.wait()
            return
        except TimeoutError:
            pass
        try:
            if not await self.claims.take(request.id, OWNER):
                return  # the classifier took it just now; its events are on their way
        except Exception as exc:  # no claim, no fallback: two routings would be worse than a wait
            log.warning("request %s: cannot claim it for the routing fallback: %r", request.id, exc)
            return
        with contextlib.suppress(Exception):
            await self.js.delete_msg(subjects.REQUEST_STREAM, queued)
        reply = hdrs[headers.REPLY]
        try:
            routes = self.table.current()
            route = routes.default
            model, note = available_model(routes, route, await self.available.available())
        except LlmbusError as exc:
            await self._fail(reply, 0, f"no classifier answered, and {exc.message}", exc.code)
            return
        why = f"no classifier answered within {self.wait_s:g} s; the default route's model{note}"
        log.warning("request %s: %s (%s)", request.id, why, model)
        await self.nc.publish(reply, _encode(Start(seq=0, attempt=1, request_id=request.id, model=model)))
        routed = Routed(
            seq=1, attempt=1, model=model, route=route.name, score=0.0, method="edge_fallback", why=why
        )
        await self.nc.publish(reply, _encode(routed))
        try:
            await republish(
                self.js,
                msgspec.structs.replace(request, model=model),
                reply=reply,
                seq=2,
                deadline_ms=hdrs.get(headers.DEADLINE),
                origin=hdrs.get(headers.ORIGIN),
                route=route.name,
            )
        except Exception as exc:
            await self._fail(reply, 2, f"the request queue is unavailable: {exc!r}")

    async def _fail(
        self, reply: str, seq: int, message: str, code: ErrorCode = ErrorCode.BACKEND_UNAVAILABLE
    ) -> None:
        retry_after = 1 if code is ErrorCode.BACKEND_UNAVAILABLE else None
        error = Error(seq=seq, attempt=1, code=code, message=message, retry_after=retry_after)
        await self.nc.publish(reply, _encode(error))
