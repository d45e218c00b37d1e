"""Liveness and readiness."""

from __future__ import annotations

import msgspec
from litestar import Response, get
from litestar.di import NamedDependency
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError

from contracts import subjects
from services.runtime.inventory import InventoryView
from services.runtime.settings import Settings


class Readiness(msgspec.Struct):
    ready: bool
    instance: str  # this edge process's id (`LLMBUS_INSTANCE_ID`): `llmbus up` knows its own edge by it
    nats: bool
    stream: bool
    consumer: bool
    generators: bool
    models: int | None = None  # models some host serves (the janitors' inventory); None: no janitor yet
    # LLMBUS_READY_NEEDS_MODELS: ready also waits for `models` (a janitor's first inventory)
    needs_models: bool = False


@get("/health/live", summary="The edge process is up")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@get("/health/ready", summary="NATS, request stream and consumer, a live generator (and listed models)")
async def ready(
    settings: NamedDependency[Settings],
    instance: NamedDependency[str],
    nc: NamedDependency[Client | None],
    inventory: NamedDependency[InventoryView | None],
) -> Response[Readiness]:
    """`nc` and `inventory` are None while the edge is still connecting (services/edge/wiring.py)."""
    state = Readiness(
        ready=False,
        instance=instance,
        nats=nc is not None and nc.is_connected,
        stream=False,
        consumer=False,
        generators=False,
    )
    if nc is not None and state.nats:
        js = nc.jetstream()
        try:
            await js.stream_info(subjects.REQUEST_STREAM)
            state.stream = True
            # `generator`, or one `generator-<models>` per backend host (LLMBUS_GENERATE_MODELS).
            names = [c.name for c in await js.consumers_info(subjects.REQUEST_STREAM)]
            state.consumer = any(n == "generator" or n.startswith("generator-") for n in names)
        except (NotFoundError, NatsTimeoutError):
            pass
        try:
            # Every worker is a NATS micro service; one PING answer proves a live generator.
            await nc.request("$SRV.PING.llmbus-generator", b"", timeout=0.5)
            state.generators = True
        except (NoRespondersError, NatsTimeoutError):
            pass
    if inventory is not None and inventory.populated:
        state.models = len(inventory.ready_models())
    state.needs_models = settings.ready_needs_models
    have_models = bool(state.models) or not state.needs_models
    state.ready = state.nats and state.stream and state.consumer and state.generators and have_models
    return Response(state, status_code=200 if state.ready else 503)
