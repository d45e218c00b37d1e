"""Fixtures: a real nats-server per test, the fake Ollama, and the services in-process.

Each test gets its own NATS server (about 50 ms to start), so tests never share streams,
consumers or leftover messages.

The run is hermetic: it sees none of the caller's `LLMBUS_*` / `NATS_*` variables, works in a
directory of its own (so a `.llmbus/` left by `llmbus up` in the checkout is never read), and
fails if any process it started outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
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
from tests.postgres import Postgres, ensure_installed, unavailable

ROOT = Path(__file__).resolve().parent.parent
_PR_SET_CHILD_SUBREAPER = 36
_workdir: Path | None = None


def hermetic_environment(environ: dict[str, str] | os._Environ[str], workdir: Path) -> None:
    """Drops the caller's llmbus and NATS settings; points the data directory into `workdir`."""
    for key in [k for k in environ if k.startswith(("LLMBUS_", "NATS_"))]:
        del environ[key]
    environ["LLMBUS_DATA_DIR"] = str(workdir / ".llmbus")
    environ["LLMBUS_RESPONSE_CACHE"] = "off"  # repeats reach the model; cache tests turn it on
    # Subprocesses import `tests.*` and `scripts.*` from the checkout whatever their directory.
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH", "")]))


def pytest_configure(config: pytest.Config) -> None:
    global _workdir
    _workdir = Path(tempfile.mkdtemp(prefix="llmbus-tests-"))
    hermetic_environment(os.environ, _workdir)
    # Relative defaults (infra/routes.toml, infra/tenants.toml, ...) still find the checkout's files.
    (_workdir / "infra").symlink_to(ROOT / "infra")
    os.chdir(_workdir)
    if sys.platform == "linux":  # orphans of killed children become ours, so the check below sees them
        ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No process a test started may outlive the run: each survivor is named, killed, and fails it."""
    survivors = [p for p in psutil.Process().children(recursive=True) if _alive(p)]
    for proc in survivors:
        with contextlib.suppress(psutil.Error):
            sys.stderr.write(f"\nleft running by the tests: pid {proc.pid}: {' '.join(proc.cmdline())}\n")
            proc.kill()
    if survivors:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    os.chdir(ROOT)
    if _workdir is not None:
        shutil.rmtree(_workdir, ignore_errors=True)


def _alive(proc: psutil.Process) -> bool:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)  # reap it: exited, just not yet waited for
            return False
        return True
    except psutil.NoSuchProcess:
        return False


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
        response_cache="off",  # as the environment above; tests/test_response_cache.py turns it on
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
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
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
        # Serving starts at once; the routes that need NATS work once the edge has attached to it.
        while not self.server.started or getattr(self.app.state, "dispatcher", None) is None:
            if self.task.done():
                self.task.result()
            assert not getattr(self.app.state, "failed", False), "the edge could not start (see its log)"
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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster for the session (skips with the reason when none can run)."""
    bin_dir = ensure_installed()
    if bin_dir is None:
        pytest.skip(unavailable() or "PostgreSQL unavailable")
    server = Postgres(bin_dir).init()
    try:
        yield server
    finally:
        server.destroy()
