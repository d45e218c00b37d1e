"""The edge's Litestar application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig

from contracts import ErrorCode, LlmbusError
from services.edge import models
from services.edge.admission import PUBLIC_PATHS, PUBLIC_PREFIXES, Admission, authenticate
from services.edge.classify import classify
from services.edge.compat.ollama import router as ollama_router
from services.edge.compat.openai import router as openai_router
from services.edge.compat.openai_batches import router as openai_batches
from services.edge.demo import asset, page
from services.edge.depth import LimitedRequest
from services.edge.dispatch import Dispatcher
from services.edge.embed import embed
from services.edge.errors import exception_handlers, with_retry_after
from services.edge.generation import chat, generate
from services.edge.health import live, ready
from services.edge.ledger_routes import ROUTES as LEDGER_ROUTES
from services.edge.observability import Observability
from services.edge.requests import cancel_request, request_events
from services.edge.routing import RouteFallback
from services.edge.task_catalog import load_tasks
from services.edge.tasks import list_tasks, run_task, show_task
from services.runtime import bus
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.edge")


async def attach(app: Litestar, settings: Settings) -> None:
    """Connects to NATS (retrying while it is down) and builds everything that needs it; the edge
    serves `/health/live` meanwhile, and other routes answer 503 `bus_unavailable`."""
    nc = await bus.connect_with_retry(settings, "llmbus-edge")
    app.state.closers.append(nc.drain)
    await bus.provision(nc.jetstream(), settings)
    inventory = await models.start(app.state, nc)  # the janitors' model list, kept by a KV watch
    app.state.closers.append(inventory.stop)
    # API keys and limits (a broken tenants file stops the edge here, before it serves).
    admission = app.state.admission = await Admission(settings, nc.jetstream(), inventory).start()
    app.state.closers.append(admission.stop)
    app.state.nc = nc
    app.state.dispatcher = Dispatcher(
        nc,
        max_timeout_s=settings.request_timeout_s,
        fallback=RouteFallback(nc, settings),
        inventory=inventory if settings.edge_model_check else None,
        admission=admission,
    )


async def connected(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Routes other than health, metrics, the schema and the demo page need the bus."""
    if getattr(connection.app.state, "dispatcher", None) is not None:
        return
    path = connection.scope["path"]
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return
    raise LlmbusError(
        ErrorCode.BUS_UNAVAILABLE,
        "the edge is not connected to NATS yet (see its log and /health/ready); retry shortly",
        retry_after=1,
    )


def create_app(
    settings: Settings,
    *,
    on_ready: Callable[[], None] | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> Litestar:
    """The edge. `on_ready` is called once it is attached to NATS; `on_fatal` when it cannot start
    (a broken tenants file, a refused provisioning): the server then stops, not 503s forever."""
    tasks = load_tasks(settings.tasks_dir or None)  # a broken task file stops the edge here
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.tasks = tasks
        app.state.instance = settings.instance_id or uuid.uuid4().hex
        app.state.closers = []

        async def attaching() -> None:
            try:
                await attach(app, settings)
                if on_ready is not None:
                    on_ready()
            except Exception:
                log.exception("the edge cannot start")
                app.state.failed = True
                if on_fatal is not None:
                    on_fatal()

        task = asyncio.create_task(attaching())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for close in reversed(app.state.closers):
                await close()

    return Litestar(
        route_handlers=[
            chat,
            generate,
            request_events,
            cancel_request,
            classify,
            embed,
            live,
            ready,
            *models.ROUTES,
            *LEDGER_ROUTES,
            openai_router,
            openai_batches(settings),
            ollama_router,
            list_tasks,
            show_task,
            run_task,
            page,
            asset,
        ],
        lifespan=[lifespan],
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        after_request=with_retry_after,  # every 429 and 503 has a Retry-After
        guards=[connected, authenticate],  # the bus, API keys and admin scope, for every route
        cors_config=CORSConfig(allow_origins=origins) if origins else None,  # closed unless configured
        request_max_body_size=settings.max_body_bytes,
        request_class=LimitedRequest,  # a JSON body nested too deeply is 400, not a RecursionError
        openapi_config=OpenAPIConfig(title="llmbus", version="0.1.0", path="/schema"),
        plugins=[Observability()],  # server span, request metrics and log context; GET /metrics
    )
