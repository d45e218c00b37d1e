"""The edge's Litestar application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from services.edge.compat.ollama import router as ollama_router
from services.edge.compat.openai import router as openai_router
from services.edge.dispatch import Dispatcher
from services.edge.errors import exception_handlers
from services.edge.generation import chat, generate
from services.edge.health import live, ready
from services.runtime import bus
from services.runtime.settings import Settings


def create_app(settings: Settings) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        nc = await bus.connect(settings, "llmbus-edge")
        await bus.provision(nc.jetstream(), settings)
        app.state.nc = nc
        app.state.dispatcher = Dispatcher(nc, max_timeout_s=settings.request_timeout_s)
        try:
            yield
        finally:
            await nc.drain()

    return Litestar(
        route_handlers=[chat, generate, live, ready, openai_router, ollama_router],
        lifespan=[lifespan],
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="llmbus", version="0.1.0", path="/schema"),
    )
