"""Seed 003's model, system and queue routes (the shared dialect, services/edge/dialects/shared.py).

Models come from the janitors' inventory and admin API, as `/v1/models` and the Ollama-compatible
routes do: list, `ps`, `show`, and `create`/`copy` (admin keys, as `/v1/models/create|copy`).
`health` pings the generators; `queue/stats` reads JetStream's consumers; `metrics` is the ledger's
stats in the seed's shape. Seed routes llmbus has no counterpart for answer `501 not_implemented`
naming the feature, never a made-up answer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import Redirect
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from contracts import ErrorCode, LlmbusError, subjects
from contracts.ledger import StatsQuery, StatsReport
from contracts.models import CopyRequest, ModelInfo, ModelRef, OpDone, OpError, canonical_model
from services.edge.compat.ollama_models import details, loaded
from services.edge.dialects.shared_http import json_answer, shared_get, shared_post
from services.edge.errors import request_id_of
from services.edge.models import ADMIN_ONLY, listing
from services.runtime import ledger_client
from services.runtime.admin_client import AdminClient
from services.runtime.inventory import InventoryView
from services.runtime.settings import Settings

VERSION = "2.0.0"  # the seed's API version, as its health answers it
Admin = NamedDependency[AdminClient]
Inventory = NamedDependency[InventoryView]
Nats = NamedDependency[Client]


# -- models


@shared_get("/api/v1/models", "available models")
async def models(request: Request[Any, Any, Any], inventory: Inventory) -> Response[bytes]:
    entries = [
        {"name": model.id, "size": ready[0].size or None, "modified_at": _iso(ready[0].updated_at)}
        for model in listing(inventory, None, loaded_only=False).data
        if (ready := [info for info in model.hosts if info.ready])
    ]
    return json_answer({"models": entries}, request_id_of(request))


@shared_get("/api/v1/models/ps", "running models (Ollama's /api/ps)")
async def running(request: Request[Any, Any, Any], inventory: Inventory) -> Response[bytes]:
    return json_answer({"models": loaded(inventory)}, request_id_of(request))


@shared_get("/api/v1/models/{name:str}/show", "model details (Ollama's /api/show)")
async def show(
    request: Request[Any, Any, Any], name: FromPath[str], inventory: Inventory, admin: Admin
) -> Response[bytes]:
    return json_answer(await details(name, inventory, admin), request_id_of(request))


class CreateBody(msgspec.Struct, kw_only=True):
    name: str
    modelfile: str
    stream: bool = False  # the seed passed it on, then read one JSON answer: the answer is the end


@shared_post("/api/v1/models/create", "create a model from a Modelfile", opt=ADMIN_ONLY)
async def create(
    request: Request[Any, Any, Any], data: JSONBody[CreateBody], admin: Admin
) -> Response[bytes]:
    ModelRef(data.name).validate()
    host = admin.host_for(None, data.name, where_it_is=False)
    last = None
    async for event in await admin.operate("create", {"model": data.name, "modelfile": data.modelfile}, host):
        last = event
    if isinstance(last, OpError):
        raise LlmbusError(last.code, last.message)
    assert isinstance(last, OpDone)  # the events end with done or error
    return json_answer({"status": "success"}, request_id_of(request))  # Ollama's, which the seed relayed


class CopyBody(msgspec.Struct, kw_only=True):
    destination: str


@shared_post("/api/v1/models/{name:str}/copy", "copy a model under a new name", opt=ADMIN_ONLY)
async def copy(
    request: Request[Any, Any, Any], name: FromPath[str], data: JSONBody[CopyBody], admin: Admin
) -> Response[bytes]:
    req = CopyRequest(source=name, destination=data.destination)
    req.validate()
    info = await admin.call("copy", req, ModelInfo, admin.host_for(None, name))
    body = {"status": "success", "source": name, "destination": canonical_model(info.model)}
    return json_answer(body, request_id_of(request))


# -- health, queue, metrics


@shared_get("/api/v1/health", "health (a generator answers)")
async def health(request: Request[Any, Any, Any], nc: NamedDependency[Client | None]) -> Response[bytes]:
    """Public, as the seed's was; `nc` is None while the edge is still connecting to NATS."""
    healthy, service = False, "unhealthy: the edge is not connected to NATS yet"
    if nc is not None:
        try:
            await nc.request("$SRV.PING.llmbus-generator", b"", timeout=0.5)  # a live generator
            healthy, service = True, "healthy"
        except (NoRespondersError, NatsTimeoutError):
            service = "unhealthy: no generator answers"
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "ollama_status": "running" if healthy else "unavailable",  # the seed's README
        "ollama_service": service,  # the seed's code
        "version": VERSION,
    }
    return json_answer(body, request_id_of(request))


class QueueCounts(msgspec.Struct):
    waiting: int = 0
    running: int = 0
    slots: int = 0  # generator slots: each idle one keeps a pull request waiting on the server


async def queue_counts(js: JetStreamContext) -> QueueCounts:
    """Generation requests waiting and running. `LLM_REQ` is a work queue: a request stays in it
    until its end is acked, so the stream's count per subject is waiting + running (also with no
    generator consuming), and the consumers' unacked deliveries are the running ones. One place to
    switch to `GET /v1/queue` once it exists."""
    counts = QueueCounts()
    info = await js.stream_info(subjects.REQUEST_STREAM, subjects_filter=subjects.REQUEST_SUBJECTS)
    queued = sum(n for subject, n in (info.state.subjects or {}).items() if not subject.startswith(_EMBED))
    for consumer in await js.consumers_info(subjects.REQUEST_STREAM):
        config = consumer.config
        filters = config.filter_subjects or [config.filter_subject or ""]
        if any(f.startswith(_EMBED) for f in filters):
            continue
        running = consumer.num_ack_pending or 0
        counts.running += running
        if not any(f.startswith("llm.req.route") for f in filters):
            counts.slots += running + (consumer.num_waiting or 0)
    counts.waiting = max(0, queued - counts.running)
    return counts


_EMBED = "llm.req.embed"


@shared_get("/api/v1/queue/stats", "queue statistics")
async def queue_stats(
    request: Request[Any, Any, Any], nc: Nats, settings: NamedDependency[Settings]
) -> Response[bytes]:
    counts = await queue_counts(nc.jetstream())
    unknown = None  # kept by the ledger per request (GET /api/v1/metrics, /v1/stats), not counted here
    body = {
        "queued": counts.waiting,
        "in_progress": counts.running,
        "completed": unknown,
        "failed": unknown,
        "rejected": unknown,
        "timeout": unknown,
        "total_wait_time_ms": unknown,
        "max_wait_time_ms": unknown,
        "avg_wait_time_ms": unknown,
        "max_concurrent": counts.slots,
        "max_queue_size": settings.max_queue,
        "default_timeout": 120.0,
    }
    return json_answer(body, request_id_of(request))


@shared_get("/api/v1/metrics", "service metrics (the ledger's stats)")
async def metrics(
    request: Request[Any, Any, Any], nc: Nats, window_minutes: FromQuery[int | None] = None
) -> Response[bytes]:
    window_s = (window_minutes or 30 * 24 * 60) * 60.0  # none: the ledger's last 30 days
    report = await ledger_client.call(nc, "stats", StatsQuery(window_s=window_s), StatsReport)
    return json_answer(seed_metrics(report), request_id_of(request))


def seed_metrics(report: StatsReport) -> dict[str, Any]:
    """The seed's `MetricsResponse` from per-model stats. Latency percentiles over several models
    are weighted by requests (exact for one model); the ledger keeps percentiles, not a mean."""
    total = sum(m.requests for m in report.models)
    errors: dict[str, int] = {}
    for m in report.models:
        for code, n in m.errors.items():
            errors[code] = errors.get(code, 0) + n
    failed = sum(errors.values())

    def weighted(pick: str) -> float:
        timed = [(m.requests, getattr(m.duration_ms, pick)) for m in report.models if m.duration_ms]
        weight = sum(n for n, _ in timed)
        return round(sum(n * v for n, v in timed) / weight, 2) if weight else 0.0

    return {
        "total_requests": total,
        "successful_requests": total - failed,
        "failed_requests": failed,
        "requests_by_model": {m.model: m.requests for m in report.models},
        "requests_by_operation": {},  # the ledger's stats are per model
        "average_latency_ms": weighted("p50"),
        "p50_latency_ms": weighted("p50"),
        "p95_latency_ms": weighted("p95"),
        "p99_latency_ms": weighted("p99"),
        "errors_by_type": errors,
        "last_request_time": None,
        "first_request_time": None,
        "window": {"since": _iso(report.since), "until": _iso(report.until)},
    }


def _iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat().replace("+00:00", "Z")


# -- what llmbus has no counterpart for: 501, naming the feature


def _missing(feature: str, instead: str) -> str:
    return f"{feature} is not implemented by llmbus's shared dialect; {instead}"


_BATCH = _missing(
    "batch processing", "send the requests one by one, or use OpenAI's batch API at /openai/v1/batches"
)
_AGENTS = _missing("the Ollama agent system", "llmbus has no agents")
_PROFILE = _missing(
    "the hardware model profile", "GET /api/v1/models and /v1/models list what each host serves"
)
_PERF = _missing(
    "performance statistics", "GET /api/v1/metrics or /v1/stats give the ledger's per-model statistics"
)
_ANALYTICS = _missing("the analytics report", "GET /v1/usage and /v1/history give the ledger's records")


def _not_implemented(message: str) -> Any:
    async def refuse() -> None:
        raise LlmbusError(ErrorCode.NOT_IMPLEMENTED, message)

    return refuse


def _refusals() -> list[Any]:
    post_paths = {
        "/api/v1/batch/chat": _BATCH,
        "/api/v1/batch/vlm": _BATCH,
        "/api/v1/batch/chat/completions": _BATCH,
        "/api/v1/batch/vlm/completions": _BATCH,
        "/api/v1/agents/create": _AGENTS,
        "/api/v1/agents/{name:str}/run": _AGENTS,
    }
    get_paths = {
        "/api/v1/agents": _AGENTS,
        "/api/v1/system/model-profile": _PROFILE,
        "/api/v1/performance/stats": _PERF,
        "/api/v1/analytics": _ANALYTICS,
    }
    handlers = []
    for route, paths in ((shared_post, post_paths), (shared_get, get_paths)):
        for path, message in paths.items():
            refuse = _not_implemented(message)
            handlers.append(route(path, "not implemented (501)", name=path, include_in_schema=False)(refuse))
    return handlers


@shared_get("/api/docs", "interactive API documentation", include_in_schema=False)
async def docs() -> Redirect:
    return Redirect("/schema/swagger")


ROUTES = [models, running, show, create, copy, health, queue_stats, metrics, docs, *_refusals()]
