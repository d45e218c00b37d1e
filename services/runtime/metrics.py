"""The Prometheus metrics of the edge and the workers, defined and recorded in one place.

One registry per role, so each endpoint shows its own families only: the edge serves `EDGE` at
`/metrics` on its HTTP port; a worker process serves `WORKER` on `LLMBUS_METRICS_PORT` plus its
role's offset (`port_for`), the janitor its own registry (services/janitor/metrics.py) likewise.
Recording happens once per request or per model call, never per token. Names follow Prometheus
conventions (base units, `_total` counters) and, for model calls, the OpenTelemetry GenAI metric
conventions translated to Prometheus (`gen_ai.client.token.usage` becomes
`gen_ai_client_token_usage`, attributes become labels). docs/operations.md lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

from nats.js import JetStreamContext
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.exposition import choose_encoder

from contracts import subjects
from services.runtime.request_ended import RequestEnded

log = logging.getLogger(__name__)

# No `_created` series: they double the text and Prometheus does not use them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def _registry() -> CollectorRegistry:
    """A role's registry, with the process, platform and GC collectors every process has."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


EDGE = _registry()
WORKER = _registry()  # generator, embedder, classifier: one process may run several
JANITOR = _registry()

# The GenAI conventions' boundaries, extended to 600 s: a cold model load may take 300 s, and a
# first token after that must land in a bucket, not in +Inf.
_GENAI_TTFT = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    7.5,
    10,
    30,
    60,
)
_TTFT_BUCKETS = (*_GENAI_TTFT, 120, 300, 600)
_DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
    300,
    600,
)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)

# ---------------------------------------------------------------------------------------- edge
HTTP_REQUESTS = Counter(
    "llmbus_requests",
    "Generation requests answered by the edge, by endpoint, model and outcome code (ok or an error code)",
    ["endpoint", "model", "code"],
    registry=EDGE,
)
HTTP_DURATION = Histogram(
    "llmbus_request_duration_seconds",
    "From the HTTP request's arrival to its last byte, as the client sees it",
    ["endpoint", "model", "code"],
    buckets=_DURATION_BUCKETS,
    registry=EDGE,
)
HTTP_TTFT = Histogram(
    "llmbus_time_to_first_token_seconds",
    "From the HTTP request's arrival to the edge relaying its first token (queueing included)",
    ["endpoint", "model"],
    buckets=_TTFT_BUCKETS,
    registry=EDGE,
)
STREAMS_IN_FLIGHT = Gauge(
    "llmbus_streams_in_flight",
    "Accepted requests whose events the edge is relaying now (SSE or a pending JSON answer)",
    ["endpoint"],
    registry=EDGE,
)
QUEUE_PENDING = Gauge(
    "llmbus_queue_pending_messages",
    "Requests waiting in JetStream for a worker (consumer num_pending), polled at scrape time",
    ["consumer", "subject"],
    registry=EDGE,
)
QUEUE_ACK_PENDING = Gauge(
    "llmbus_queue_ack_pending_messages",
    "Requests delivered to a worker and not acknowledged yet (consumer num_ack_pending)",
    ["consumer", "subject"],
    registry=EDGE,
)
CACHE_LOOKUPS = Counter(
    "llmbus_cache_lookups",
    "Response cache lookups (docs/cache.md), by kind (exact, semantic) and result (hit, miss)",
    ["kind", "result"],
    registry=EDGE,
)
CACHE_STORED_BYTES = Counter(
    "llmbus_cache_stored_bytes",
    "Bytes of answers this edge wrote to the response cache",
    registry=EDGE,
)

# -------------------------------------------------------------------------------------- worker
WORKER_REQUESTS = Counter(
    "llmbus_worker_requests",
    "Requests a worker ended, by request subject, model and outcome code (ok or an error code)",
    ["subject", "model", "code"],
    registry=WORKER,
)
WORKER_IN_FLIGHT = Gauge(
    "llmbus_worker_requests_in_flight",
    "Requests a worker process is running now",
    ["service"],
    registry=WORKER,
)

# ---------------------------------------------------------------- model calls (GenAI conventions)
_GENAI = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
MODEL_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of one call to the model server",
    [*_GENAI, "error_type"],
    buckets=_DURATION_BUCKETS,
    registry=WORKER,
)
MODEL_TTFT = Histogram(
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "From sending a call to the model server to its first streamed token",
    _GENAI,
    buckets=_TTFT_BUCKETS,
    registry=WORKER,
)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per model call, by gen_ai_token_type (input or output); _sum counts tokens in and out",
    [*_GENAI, "gen_ai_token_type"],
    buckets=_TOKEN_BUCKETS,
    registry=WORKER,
)
UPSTREAM_ERRORS = Counter(
    "llmbus_upstream_errors",
    "Failed calls to the model server, by the error code they became",
    [*_GENAI, "error_type"],
    registry=WORKER,
)

# Model names come from clients: past this many distinct names a process labels the rest
# "other", so a stream of made-up names cannot grow the metrics without bound.
MAX_MODELS = 100
_models: set[str] = set()


def model_label(model: str) -> str:
    if model in _models:
        return model
    if len(_models) >= MAX_MODELS:
        return "other"
    _models.add(model)
    return model


# ------------------------------------------------------------------------------------ recording
def http_request_ended(endpoint: str, model: str, code: str, duration_s: float, ttft_s: float | None) -> None:
    model = model_label(model)
    HTTP_REQUESTS.labels(endpoint, model, code).inc()
    HTTP_DURATION.labels(endpoint, model, code).observe(duration_s)
    if ttft_s is not None:
        HTTP_TTFT.labels(endpoint, model).observe(ttft_s)


def worker_request_ended(ended: RequestEnded) -> None:
    """Called once per request, when the worker publishes its terminal event."""
    WORKER_REQUESTS.labels(ended.family, model_label(ended.model), ended.code).inc()


def worker_request_rejected(subject: str) -> None:
    """A malformed request, terminated before it became a job."""
    WORKER_REQUESTS.labels(subjects.request_family(subject), "", "bad_request").inc()


def model_call_ended(
    labels: tuple[str, str, str],
    duration_s: float,
    ttft_s: float | None,
    tokens: tuple[int, int] | None,
    error: str | None,
) -> None:
    operation, provider, model = labels
    model = model_label(model)
    MODEL_DURATION.labels(operation, provider, model, error or "").observe(duration_s)
    if ttft_s is not None:
        MODEL_TTFT.labels(operation, provider, model).observe(ttft_s)
    if tokens is not None:
        TOKEN_USAGE.labels(operation, provider, model, "input").observe(tokens[0])
        TOKEN_USAGE.labels(operation, provider, model, "output").observe(tokens[1])
    if error is not None and error != "cancelled":
        UPSTREAM_ERRORS.labels(operation, provider, model, error).inc()


async def poll_queues(js: JetStreamContext) -> None:
    """Sets the queue gauges from every consumer of the request stream: one call per scrape."""
    try:
        async with asyncio.timeout(1.0):
            consumers = await js.consumers_info(subjects.REQUEST_STREAM)
    except Exception as exc:  # NATS away or slow: keep the last values, say so once per scrape
        log.debug("queue depth poll failed: %r", exc)
        return
    for info in consumers:
        config = info.config
        name = info.name or config.durable_name or "?"
        subject = config.filter_subject or ",".join(config.filter_subjects or ()) or subjects.REQUEST_SUBJECTS
        QUEUE_PENDING.labels(name, subject).set(info.num_pending or 0)
        QUEUE_ACK_PENDING.labels(name, subject).set(info.num_ack_pending or 0)


def render(accept: str | None, registry: CollectorRegistry = EDGE) -> tuple[bytes, str]:
    """The exposition and its content type, as prometheus_client negotiates them from `Accept`
    (OpenMetrics for a scraper that asks for it, the text format otherwise)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


# ------------------------------------------------------------------------ worker process endpoint
# Each role's endpoint is `LLMBUS_METRICS_PORT` + its offset, so `llmbus up` (one host, every role)
# and a Prometheus scrape config know every port in advance. The edge serves on its HTTP port.
ROLE_OFFSETS = {"generator": 0, "embedder": 1, "classifier": 2, "janitor": 3}
# Past the roles' ports: where a second process of a role on the same host goes (the log names it).
SPILL = len(ROLE_OFFSETS)
PORT_RANGE = 16


def port_for(role: str, base: int, replica: int = 0) -> int:
    """The metrics port of `role`'s process number `replica` for the base `LLMBUS_METRICS_PORT`
    (0: off). The first process of a role has its role's port, the others (`llmbus up` numbers
    them) the spill range in order; edges, which share their HTTP port, each a port past it."""
    if not base:
        return 0
    if role == "edge":
        return base + PORT_RANGE + replica
    return base + (ROLE_OFFSETS.get(role, SPILL) if replica == 0 else SPILL + replica - 1)


class _Server:
    """A process's endpoint for one registry, shared by every user in it (reference counted)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.lock = threading.Lock()
        self.users = 0
        self.server: object | None = None
        self.thread: threading.Thread | None = None
        self.port = 0

    def acquire(self, host: str, port: int) -> None:
        """Serves the registry on `port`, or, if another process has it, the first free port of
        the spill range `port - offset + SPILL` .. `+ PORT_RANGE`."""
        with self.lock:
            self.users += 1
            if self.server is not None:
                return
            for candidate in (port, *range(port + SPILL, port + PORT_RANGE)):
                try:
                    self.server, self.thread = start_http_server(candidate, addr=host, registry=self.registry)
                except OSError:
                    continue
                self.port = candidate
                log.info("metrics at http://%s:%d/metrics", host, candidate)
                return
            log.warning("no free metrics port from %d; running without /metrics", port)

    def release(self) -> None:
        with self.lock:
            if self.users == 0:
                return
            self.users -= 1
            if self.users == 0 and self.server is not None:
                server, self.server = self.server, None
                server.shutdown()  # type: ignore[attr-defined]
                server.server_close()  # type: ignore[attr-defined]


_server = _Server(WORKER)
janitor_server = _Server(JANITOR)


class _InFlight(Protocol):
    @property
    def in_flight(self) -> int: ...

    service: str


def _gauge_of(worker: _InFlight) -> Callable[[], float]:
    ref = weakref.ref(worker)

    def value() -> float:
        live = ref()
        return float(live.in_flight) if live is not None else 0.0

    return value


def watch_worker(worker: _InFlight, host: str, port: int, replica: int = 0) -> None:
    """Called by `Worker.start`: exports its in-flight count and, if `port` (the base), serves
    `/metrics` on its role's port (`port_for`)."""
    WORKER_IN_FLIGHT.labels(worker.service).set_function(_gauge_of(worker))
    if port:
        _server.acquire(host, port_for(worker.service, port, replica))


def served_port() -> int:
    """The port this process's worker endpoint listens on (0: none)."""
    return _server.port if _server.server is not None else 0


def unwatch_worker(worker: _InFlight) -> None:
    """Called by `Worker.stop`: the endpoint stops with the process's last worker."""
    with contextlib.suppress(KeyError):
        WORKER_IN_FLIGHT.remove(worker.service)
    _server.release()
