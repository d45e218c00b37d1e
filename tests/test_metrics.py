"""Prometheus metrics, scraped and parsed as Prometheus would: the edge's `/metrics` and a worker's.

Edge, generator and fake Ollama run in one test process; each role still has its own registry, so
each endpoint shows its own families only. Every assertion compares a scrape after the action with
one before it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts import subjects
from services.generator.main import Generator
from services.runtime import bus, metrics
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events
from tests.test_janitor import janitor, use

MODEL = "llama3.2:1b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def worker_samples() -> Samples:
    """The worker registry of this process, as its endpoint would serve it."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.render(None, metrics.WORKER)[0].decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape_until(url: str, ready: Callable[[Samples], bool]) -> Samples:
    """Scrapes until `ready` holds: a request's metrics are recorded just after its last byte (the
    janitor's gauges after its next look at the host: seconds on a loaded machine)."""
    async with asyncio.timeout(15):
        while not ready(samples := await scrape(url)):
            await asyncio.sleep(0.02)
    return samples


async def test_edge_counts_a_streamed_request_by_endpoint_model_and_code(
    edge: Edge, client: httpx.AsyncClient
) -> None:
    url = f"{edge.url}/metrics"
    ok = {"endpoint": "/v1/chat", "model": MODEL, "code": "ok"}
    before = await scrape(url)
    async with client.stream("POST", "/v1/chat", json={**CHAT, "stream": True}) as response:
        assert [e.event async for e in sse_events(response)][-1] == "done"

    after = await scrape_until(
        url,
        lambda s: value(s, "llmbus_requests_total", **ok) == value(before, "llmbus_requests_total", **ok) + 1,
    )
    for name, labels in (
        ("llmbus_request_duration_seconds_count", ok),
        ("llmbus_time_to_first_token_seconds_count", {"endpoint": "/v1/chat", "model": MODEL}),
    ):
        assert value(after, name, **labels) == value(before, name, **labels) + 1, name
    assert value(after, "llmbus_streams_in_flight", endpoint="/v1/chat") == 0


async def test_error_outcomes_are_counted_by_their_stable_code(
    edge: Edge, client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    url = f"{edge.url}/metrics"
    missing = {"endpoint": "/v1/generate", "model": "nope:1b", "code": "model_not_found"}
    invalid = {"endpoint": "/v1/generate", "model": "", "code": "bad_request"}
    too_large = {"endpoint": "/v1/generate", "model": "", "code": "request_too_large"}
    before = await scrape(url)
    response = await client.post("/v1/generate", json={"model": MODEL, "prompt": "x" * 100_000})
    assert response.status_code == 413
    response = await client.post("/v1/generate", json={"model": "nope:1b", "prompt": "Hi"})
    assert response.json()["error"]["code"] == "model_not_found"
    response = await client.post("/v1/generate", json={"model": MODEL, "prompt": 42})
    assert response.json()["error"]["code"] == "bad_request"

    def counted(s: Samples) -> bool:
        return all(
            value(s, "llmbus_requests_total", **labels)
            == value(before, "llmbus_requests_total", **labels) + 1
            for labels in (missing, invalid, too_large)
        )

    await scrape_until(url, counted)


async def test_in_flight_gauges_follow_a_running_stream(
    edge: Edge, client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    url = f"{edge.url}/metrics"
    fake_ollama.config.token_interval = 0.05
    async with client.stream("POST", "/v1/chat", json={**CHAT, "stream": True}) as response:
        events = sse_events(response)
        async for event in events:
            if event.event == "token":
                break
        during = await scrape(url)
        assert value(during, "llmbus_streams_in_flight", endpoint="/v1/chat") == 1
        assert value(worker_samples(), "llmbus_worker_requests_in_flight", service="generator") == 1
        assert [e.event async for e in events][-1] == "done"
    await scrape_until(
        url,
        lambda s: (
            value(s, "llmbus_streams_in_flight", endpoint="/v1/chat") == 0
            and value(worker_samples(), "llmbus_worker_requests_in_flight", service="generator") == 0
        ),
    )


async def test_a_client_that_leaves_mid_stream_is_counted_as_cancelled(
    edge: Edge, client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    url = f"{edge.url}/metrics"
    cancelled = {"endpoint": "/v1/chat", "model": MODEL, "code": "cancelled"}
    before = await scrape(url)
    fake_ollama.config.token_interval = 0.05
    async with client.stream("POST", "/v1/chat", json={**CHAT, "stream": True}) as response:
        async for event in sse_events(response):
            if event.event == "token":
                break  # and hang up
    after = await scrape_until(
        url,
        lambda s: (
            value(s, "llmbus_requests_total", **cancelled)
            == value(before, "llmbus_requests_total", **cancelled) + 1
        ),
    )
    assert value(after, "llmbus_streams_in_flight", endpoint="/v1/chat") == 0


async def test_queue_depth_shows_requests_waiting_for_a_worker(settings: Settings, edge: Edge) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await bus.ensure_consumer(js, settings, "generator", subjects.GENERATE_SUBJECTS)  # no worker runs
        for _ in range(3):
            request_id = uuid.uuid4().hex
            body = json.dumps({"id": request_id, "model": MODEL, "prompt": "Hi"}).encode()
            await js.publish(subjects.generate_subject(MODEL), body, headers={"Nats-Msg-Id": request_id})
    finally:
        await nc.close()
    samples = await scrape(f"{edge.url}/metrics")
    queue = {"consumer": "generator", "subject": subjects.GENERATE_SUBJECTS}
    assert value(samples, "llmbus_queue_pending_messages", **queue) == 3
    assert value(samples, "llmbus_queue_ack_pending_messages", **queue) == 0


@pytest.fixture
async def worker_metrics(settings: Settings) -> AsyncIterator[str]:
    """A generator process-alike serving its own `/metrics` on `LLMBUS_METRICS_PORT`."""
    port = free_port()
    generator = Generator(msgspec.structs.replace(settings, metrics_port=port))
    await generator.start()
    yield f"http://{settings.http_host}:{port}/metrics"
    await generator.stop(grace=0)
    with pytest.raises(httpx.ConnectError):  # the endpoint stops with the process's last worker
        await scrape(f"http://{settings.http_host}:{port}/metrics")


async def request_over_nats(settings: Settings, model: str = MODEL) -> dict[str, object]:
    request_id = uuid.uuid4().hex
    nc = await nats.connect(settings.nats_url)
    try:
        events = await nc.subscribe(subjects.event_subject(request_id))
        body = json.dumps({"id": request_id, "model": model, "prompt": "Hi"}).encode()
        await nc.jetstream().publish(
            subjects.generate_subject(model), body, headers={"Nats-Msg-Id": request_id}
        )
        async with asyncio.timeout(5):
            async for msg in events.messages:
                event: dict[str, object] = json.loads(msg.data)
                if event["type"] in ("done", "error"):
                    return event
    finally:
        await nc.close()
    raise AssertionError("no terminal event")


async def test_worker_serves_request_and_model_call_metrics(settings: Settings, worker_metrics: str) -> None:
    genai = {"gen_ai_operation_name": "text_completion", "gen_ai_provider_name": "ollama"}
    genai["gen_ai_request_model"] = MODEL
    before = await scrape(worker_metrics)
    done = await request_over_nats(settings)
    assert done["type"] == "done"
    usage = done["usage"]
    assert isinstance(usage, dict)

    after = await scrape_until(
        worker_metrics,
        lambda s: (
            value(s, "gen_ai_client_operation_duration_seconds_count", **genai, error_type="")
            == value(before, "gen_ai_client_operation_duration_seconds_count", **genai, error_type="") + 1
        ),
    )

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("llmbus_worker_requests_total", subject="llm.req.generate", model=MODEL, code="ok") == 1
    assert delta("gen_ai_client_operation_time_to_first_chunk_seconds_count", **genai) == 1
    output = delta("gen_ai_client_token_usage_sum", **genai, gen_ai_token_type="output")
    assert output == usage["completion_tokens"] == 8
    assert (
        delta("gen_ai_client_token_usage_sum", **genai, gen_ai_token_type="input") == usage["prompt_tokens"]
    )
    assert value(after, "llmbus_worker_requests_in_flight", service="generator") == 0


async def test_upstream_errors_are_counted_even_when_a_retry_succeeds(
    settings: Settings, worker_metrics: str, fake_ollama: FakeOllama
) -> None:
    labels = {
        "gen_ai_operation_name": "text_completion",
        "gen_ai_provider_name": "ollama",
        "gen_ai_request_model": MODEL,
        "error_type": "backend_error",
    }
    before = await scrape(worker_metrics)
    fake_ollama.config.fail_status = 500
    fake_ollama.config.fail_times = 1
    done = await request_over_nats(settings)
    assert done["type"] == "done"  # the generator retried before the first token
    after = await scrape(worker_metrics)
    assert value(after, "llmbus_upstream_errors_total", **labels) == (
        value(before, "llmbus_upstream_errors_total", **labels) + 1
    )


async def test_a_taken_metrics_port_moves_the_worker_to_the_spill_range(settings: Settings) -> None:
    with socket.socket() as taken:  # another generator process on this host has the role's port
        taken.bind((settings.http_host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert metrics.port_for("generator", port) == port
        generator = Generator(msgspec.structs.replace(settings, metrics_port=port))
        await generator.start()
        try:
            served = metrics.served_port()
            assert port + metrics.SPILL <= served < port + metrics.PORT_RANGE
            samples = await scrape(f"http://{settings.http_host}:{served}/metrics")
            assert value(samples, "llmbus_worker_requests_in_flight", service="generator") == 0
        finally:
            await generator.stop(grace=0)
    assert metrics.served_port() == 0


async def test_a_malformed_bus_request_is_counted_as_bad_request(
    settings: Settings, worker_metrics: str
) -> None:
    labels = {"subject": "llm.req.generate", "model": "", "code": "bad_request"}
    before = await scrape(worker_metrics)
    nc = await nats.connect(settings.nats_url)
    try:
        reply = await nc.subscribe("_INBOX.publisher.test")  # a publisher's inbox: workers may answer there
        await nc.jetstream().publish(
            subjects.generate_subject(MODEL), b'{"id": 42}', headers={"Llmbus-Reply": "_INBOX.publisher.test"}
        )
        assert json.loads((await reply.next_msg(timeout=5)).data)["code"] == "bad_request"
    finally:
        await nc.close()
    await scrape_until(
        worker_metrics,
        lambda s: (
            value(s, "llmbus_worker_requests_total", **labels)
            == value(before, "llmbus_worker_requests_total", **labels) + 1
        ),
    )


# Families any Python process exports (prometheus_client's process, platform and GC collectors).
_COMMON = ("process_", "python_")


def families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text) if not f.name.startswith(_COMMON)}


async def test_each_role_exposes_its_own_families_only(edge: Edge, worker_metrics: str) -> None:
    async with httpx.AsyncClient() as http:
        edge_text = (await http.get(f"{edge.url}/metrics")).text
        worker_text = (await http.get(worker_metrics)).text
    janitor_text = metrics.render(None, metrics.JANITOR)[0].decode()
    edge_families, worker_families = families(edge_text), families(worker_text)
    assert {"llmbus_requests", "llmbus_time_to_first_token_seconds"} <= edge_families
    assert {"llmbus_worker_requests", "gen_ai_client_token_usage"} <= worker_families
    assert not {f for f in edge_families if f.startswith(("llmbus_worker", "gen_ai", "llmbus_janitor"))}
    assert not {
        f for f in worker_families if f.startswith(("llmbus_request", "llmbus_queue", "llmbus_janitor"))
    }
    assert families(janitor_text) <= {f for f in families(janitor_text) if f.startswith("llmbus_janitor")}
    assert edge_families.isdisjoint(worker_families)


async def test_edge_negotiates_the_exposition_format_as_prometheus_client_does(edge: Edge) -> None:
    async with httpx.AsyncClient() as http:
        plain = await http.get(f"{edge.url}/metrics")
        open_metrics = await http.get(
            f"{edge.url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert plain.headers["content-type"].count("charset") == 1
    assert plain.headers["content-type"].startswith("text/plain; version=")
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.headers["content-type"].count("charset") == 1
    assert open_metrics.text.rstrip().endswith("# EOF")


def test_time_to_first_token_buckets_reach_past_a_cold_model_load() -> None:
    for histogram in (metrics.HTTP_TTFT, metrics.MODEL_TTFT):
        assert max(b for b in histogram._upper_bounds if b != float("inf")) >= 300


def test_role_ports_are_the_base_plus_a_fixed_offset() -> None:
    ports = {role: metrics.port_for(role, 9464) for role in metrics.ROLE_OFFSETS}
    assert ports == {"generator": 9464, "embedder": 9465, "classifier": 9466, "janitor": 9467}
    assert metrics.port_for("generator", 0) == 0


async def test_the_janitor_serves_its_own_metrics(
    settings: Settings, fake_ollama: FakeOllama, tmp_path: Path
) -> None:
    base = free_port()
    port = metrics.port_for("janitor", base)
    toml = '[defaults]\nidle_ttl = "0.5s"\n'
    async with janitor(settings, tmp_path, toml, metrics_port=base):
        url = f"http://{settings.http_host}:{port}/metrics"
        before = await scrape(url)
        await use(fake_ollama, "qwen2.5:0.5b")  # a request loads it; the janitor sees it in /api/ps
        loaded = await scrape_until(  # loaded, and the first reconcile (which runs beside it) timed
            url,
            lambda s: (
                value(s, "llmbus_janitor_models_loaded", host="local") == 1
                and value(s, "llmbus_janitor_reconcile_duration_seconds_count") >= 1
            ),
        )
        assert value(loaded, "llmbus_janitor_loaded_bytes", host="local", memory="total") > 0
        assert value(loaded, "llmbus_janitor_host_memory_bytes", state="total") > 0
        assert value(loaded, "llmbus_janitor_reconcile_duration_seconds_count") >= 1
        # Counted when the unload is sent; the loaded gauge follows the janitor's next /api/ps.
        await scrape_until(
            url,
            lambda s: (
                # One more than before: the counter is the process's, and earlier tests' janitors
                # in this process may have counted idle unloads already.
                value(s, "llmbus_janitor_unloads_total", reason="idle")
                == value(before, "llmbus_janitor_unloads_total", reason="idle") + 1
                and value(s, "llmbus_janitor_models_loaded", host="local") == 0
            ),
        )
        async with httpx.AsyncClient() as http:
            assert families((await http.get(url)).text) <= {
                "llmbus_janitor_models_loaded",
                "llmbus_janitor_loaded_bytes",
                "llmbus_janitor_host_memory_bytes",
                "llmbus_janitor_unloads",
                "llmbus_janitor_operations",
                "llmbus_janitor_reconcile_duration_seconds",
            }
    with pytest.raises(httpx.ConnectError):
        await scrape(url)
