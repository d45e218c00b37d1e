"""The edge's Litestar application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from services.edge import models
from services.edge.auth import Authenticate, admin_only
from services.edge.batches import router as native_batches
from services.edge.cache_routes import ROUTES as CACHE_ROUTES
from services.edge.classify import classify
from services.edge.compat.ollama import ollama_error
from services.edge.compat.ollama import router as ollama_router
from services.edge.compat.openai import openai_error
from services.edge.compat.openai import router as openai_router
from services.edge.compat.openai_batches import router as openai_batches
from services.edge.contract import ROUTES as CONTRACT_ROUTES
from services.edge.demo import asset, page
from services.edge.depth import LimitedRequest
from services.edge.dialects import mounted as mounted_dialects
from services.edge.embed import embed
from services.edge.errors import by_path, native_error, retry_after_hook
from services.edge.generation import chat, generate
from services.edge.health import live, ready
from services.edge.images import ImagePolicy
from services.edge.ledger_routes import ROUTES as LEDGER_ROUTES
from services.edge.observability import Observability
from services.edge.queue import queue
from services.edge.requests import cancel_request, request_events
from services.edge.task_catalog import load_tasks
from services.edge.tasks import list_tasks, run_task, show_task
from services.edge.wiring import Parts
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.edge")


def create_app(
    settings: Settings,
    *,
    on_ready: Callable[[], None] | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> Litestar:
    """The edge. `on_ready` is called once it is attached to NATS; `on_fatal` when it cannot start
    (a broken tenants file, a refused provisioning): the server then stops, not 503s forever.

    `app.state.dispatcher` (set once attached) and `app.state.failed` are what the process and the
    tests watch; handlers get their parts by dependency injection (services/edge/wiring.py).
    """
    parts = Parts(settings, load_tasks(settings.tasks_dir or None))  # a broken task file stops it here
    ImagePolicy.of(settings)  # so does a bad LLMBUS_IMAGE_MAX_SIDE or LLMBUS_IMAGE_QUALITY
    origins = settings.cors_origins

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async def attaching() -> None:
            try:
                app.state.dispatcher = await parts.attach()
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
            await parts.close()

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
            queue,  # GET /v1/queue
            *CACHE_ROUTES,
            openai_router,
            openai_batches(settings),
            native_batches(),
            ollama_router,
            list_tasks,
            show_task,
            run_task,
            page,
            asset,
            *CONTRACT_ROUTES,
            *mounted_dialects(settings.dialects),  # the seeds' APIs, opt-in (services/edge/dialects)
        ],
        lifespan=[lifespan],
        dependencies=parts.dependencies(),
        # A 404 or 405 under an API's prefix answers in that API's error shape.
        exception_handlers=by_path({"/openai/": openai_error, "/ollama/": ollama_error}, native_error),  # type: ignore[arg-type]
        after_request=retry_after_hook,  # every 429 and 503 has a Retry-After
        middleware=[DefineMiddleware(Authenticate, keys=parts.keys)],  # API keys: `request.user`
        guards=[parts.connected, admin_only],  # the bus, and the admin scope of admin routes
        cors_config=CORSConfig(allow_origins=origins) if origins else None,  # closed unless configured
        request_max_body_size=settings.max_body_bytes,
        request_class=LimitedRequest,  # a JSON body nested too deeply is 400, not a RecursionError
        openapi_config=OpenAPIConfig(title="llmbus", version="0.1.0", path="/schema"),
        plugins=[Observability()],  # server span, request metrics and log context; GET /metrics
    )
