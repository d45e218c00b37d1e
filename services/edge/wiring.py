"""The edge's parts, built once and handed to route handlers by Litestar's dependency injection.

`create_app` makes one `Parts`; `attach` fills it in the background once NATS answers (the edge
serves `/health/live` meanwhile, and other routes answer 503 `bus_unavailable`: the `connected`
guard). A handler names what it needs as a parameter (`dispatcher: Dispatcher`, `admission:
Admission`, `settings: Settings`, ...), and `dependencies` provides it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from nats.aio.client import Client

from contracts import ErrorCode, LlmbusError
from services.edge import models, observability
from services.edge.admission import Admission
from services.edge.auth import PUBLIC
from services.edge.dispatch import Dispatcher
from services.edge.response_cache import ResponseCache
from services.edge.routing import RouteFallback
from services.edge.serve import Pipeline
from services.edge.task_catalog import Task
from services.edge.tenants import Keyring
from services.runtime import bus
from services.runtime.admin_client import AdminClient
from services.runtime.inventory import InventoryView
from services.runtime.settings import Settings


class Parts:
    def __init__(self, settings: Settings, tasks: dict[str, Task]) -> None:
        self.settings = settings
        self.tasks = tasks
        self.instance = settings.instance_id or uuid.uuid4().hex
        self.nc: Client | None = None
        self.inventory: InventoryView | None = None
        self.admin: AdminClient | None = None
        self.admission: Admission | None = None
        self.dispatcher: Dispatcher | None = None
        self.cache: ResponseCache | None = None
        self.closers: list[Callable[[], Awaitable[Any]]] = []

    async def attach(self) -> Dispatcher:
        """Connects to NATS (retrying while it is down) and builds everything that needs it."""
        settings = self.settings
        nc = await bus.connect_with_retry(settings, "llmbus-edge")
        self.closers.append(nc.drain)
        await bus.provision(nc.jetstream(), settings)
        inventory, admin = await models.start(nc)  # the janitors' model list, kept by a KV watch
        self.closers.append(inventory.stop)
        # API keys and limits (a broken tenants file stops the edge here, before it serves).
        admission = await Admission(settings, nc.jetstream(), inventory).start()
        self.closers.append(admission.stop)
        self.nc, self.inventory, self.admin, self.admission = nc, inventory, admin, admission
        fallback = RouteFallback(nc, settings, inventory)
        self.closers.append(fallback.close)

        async def provision() -> None:
            """What the edge owns on the bus, re-created after a reconnect (a restarted NATS has lost
            what it kept in memory: LLM_OUT, the route claims, the admission counters)."""
            await bus.provision(nc.jetstream(), settings)
            await fallback.claims.reopen()
            await admission.reopen()
            if self.cache is not None:
                await self.cache.store.start()  # the response cache's bucket (file-backed, maybe lost)

        self.cache = await ResponseCache.start(nc, settings, fallback.route_cache_mode)  # shared (KV)
        self.closers.append(self.cache.stop)
        self.dispatcher = Dispatcher(
            nc,
            max_timeout_s=settings.request_timeout_s,
            fallback=fallback,
            inventory=inventory if settings.edge_model_check else None,
            admission=admission,
            on_accepted=observability.accepted,  # the request metrics follow its event feed
            provision=provision,
        )
        return self.dispatcher

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()

    def keys(self) -> Keyring | None:
        """The tenants as of now, for the authentication middleware (None: auth off, or not attached)."""
        return self.admission.keyring if self.admission is not None else None

    async def connected(
        self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        """A guard: routes other than health, metrics, the schema and the demo page need the bus."""
        if self.dispatcher is not None or _PUBLIC.match(connection.scope["path"]):
            return
        raise LlmbusError(
            ErrorCode.BUS_UNAVAILABLE,
            "the edge is not connected to NATS yet (see its log and /health/ready); retry shortly",
            retry_after=1,
        )

    def dependencies(self) -> dict[str, Provide]:
        """What handlers may ask for by name. The bus-backed ones exist once attached (the
        `connected` guard keeps other routes away until then); health and metrics take them as
        optional."""

        def provide(get: Callable[..., Any]) -> Provide:
            return Provide(get, sync_to_thread=False, use_cache=False)

        def pipeline(request: Request[Any, Any, Any]) -> Pipeline:
            assert self.dispatcher is not None  # the `connected` guard ran first
            return Pipeline(request, self.dispatcher, self.settings, self.cache)

        return {
            "settings": provide(lambda: self.settings),
            "tasks": provide(lambda: self.tasks),
            "instance": provide(lambda: self.instance),
            "nc": provide(lambda: self.nc),
            "inventory": provide(lambda: self.inventory),
            "admin": provide(lambda: self.admin),
            "admission": provide(lambda: self.admission),
            "dispatcher": provide(lambda: self.dispatcher),
            "response_cache": provide(lambda: self.cache),
            "pipeline": provide(pipeline),  # the answer pipeline, bound to the request
        }


_PUBLIC = re.compile("|".join(PUBLIC))
