"""The edge's Litestar application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.openapi import OpenAPIConfig

from services.edge import models
from services.edge.admission import Admission, authenticate
from services.edge.classify import classify
from services.edge.compat.ollama import router as ollama_router
from services.edge.compat.openai import router as openai_router
from services.edge.demo import asset, page
from services.edge.depth import LimitedRequest
from services.edge.dispatch import Dispatcher
from services.edge.embed import embed
from services.edge.errors import exception_handlers, with_retry_after
from services.edge.generation import chat, generate
from services.edge.health import live, ready
from services.edge.observability import Observability
from services.edge.requests import cancel_request, request_events
from services.edge.routing import RouteFallback
from services.edge.task_catalog import load_tasks
from services.edge.tasks import list_tasks, run_task, show_task
from services.runtime import bus
from services.runtime.settings import Settings


def create_app(settings: Settings) -> Litestar:
    tasks = load_tasks(settings.tasks_dir or None)  # a broken task file stops the edge here
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        nc = await bus.connect(settings, "llmbus-edge")
        await bus.provision(nc.jetstream(), settings)
        app.state.nc = nc
        app.state.settings = settings
        inventory = await models.start(app.state, nc)  # the janitors' model list, kept by a KV watch
        # API keys and limits (a broken tenants file stops the edge here, before it serves).
        admission = app.state.admission = await Admission(settings, nc.jetstream(), inventory).start()
        app.state.dispatcher = Dispatcher(
            nc,
            max_timeout_s=settings.request_timeout_s,
            fallback=RouteFallback(nc, settings),
            inventory=inventory if settings.edge_model_check else None,
            admission=admission,
        )
        app.state.tasks = tasks
        try:
            yield
        finally:
            await inventory.stop()
            await admission.stop()
            await nc.drain()

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
            openai_router,
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
        guards=[authenticate],  # API keys and admin scope, for every route of every API
        cors_config=CORSConfig(allow_origins=origins) if origins else None,  # closed unless configured
        request_max_body_size=settings.max_body_bytes,
        request_class=LimitedRequest,  # a JSON body nested too deeply is 400, not a RecursionError
        openapi_config=OpenAPIConfig(title="llmbus", version="0.1.0", path="/schema"),
        plugins=[Observability()],  # server span, request metrics and log context; GET /metrics
    )
