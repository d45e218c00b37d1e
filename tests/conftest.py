"""Fixtures: a real nats-server per test, the fake Ollama, and the services in-process.

Each test gets its own NATS server (about 50 ms to start), so tests never share streams,
consumers or leftover messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.edge.app import create_app
from services.edge.http_protocol import edge_protocol
from services.generator.main import Generator
from services.runtime import tracing
from services.runtime.nats_server import NatsServer, free_port
from services.runtime.settings import Settings
from tests.fakes.ollama import FakeConfig, FakeOllama


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    # Permissions on (services/runtime/nats_auth.py): every service connects as its own user; the
    # tests' own connections, without credentials, are the operator (`admin`).
    server = await NatsServer(tmp_path / "nats", auth=True, anonymous="admin").astart()
    yield server
    await server.astop()


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(FakeConfig()) as fake:
        yield fake


@pytest.fixture
def settings(nats_server: NatsServer, fake_ollama: FakeOllama) -> Settings:
    return Settings(
        nats_url=nats_server.url,
        nats_credentials=str(nats_server.credentials_file),
        ollama_url=fake_ollama.url,
        http_port=free_port(),
        ack_wait_s=2.0,
        shutdown_grace_s=1.0,
        max_body_bytes=64 * 1024,
        concurrency=8,
    )


@pytest.fixture
async def generator(settings: Settings) -> AsyncIterator[Generator]:
    gen = Generator(settings)
    await gen.start()
    yield gen
    await gen.stop(grace=0)


class Edge:
    def __init__(self, settings: Settings) -> None:
        self.url = f"http://127.0.0.1:{settings.http_port}"
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=settings.http_port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=1,
            http=edge_protocol(settings.http_header_timeout_s, settings.http_body_timeout_s),
        )
        self.server = uvicorn.Server(config)

    async def __aenter__(self) -> Edge:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await self.task


@pytest.fixture
async def edge(settings: Settings) -> AsyncIterator[Edge]:
    async with Edge(settings) as running:
        yield running


@pytest.fixture
async def client(edge: Edge, generator: Generator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        yield http


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span the process finishes, kept in memory (the tracing tests' exporter)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.reset()
    provider.shutdown()
