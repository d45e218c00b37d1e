"""The bus's own security: one NATS user per service with least-privilege permissions
(services/runtime/nats_auth.py), and NATS's `max_payload` refused loudly, never dropped."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client

from contracts import ErrorCode, GenerateRequest, headers, subjects
from services.generator.main import Generator
from services.runtime import bus, nats_auth
from services.runtime.nats_server import NatsServer, free_port, server_binary
from services.runtime.settings import Settings
from services.runtime.worker import Worker
from services.runtime.worker_job import Job
from tests.conftest import Edge

MODEL = "llama3.2:1b"
REPO = Path(__file__).resolve().parent.parent


class Connection:
    """A connection as one service's user, collecting the server's asynchronous errors."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.settings = settings
        self.role = role
        self.errors: list[str] = []

    async def __aenter__(self) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await bus.connect(self.settings, f"llmbus-{self.role}", error_cb=on_error)
        return self.nc

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def violation(self, subject: str) -> None:
        """Until the server has refused something on `subject` (permissions violation)."""
        async with asyncio.timeout(5):
            # nats-py reports the server's `-ERR` in lower case.
            while not any("permissions violation" in e and subject.lower() in e for e in self.errors):
                await asyncio.sleep(0.01)


def request_bytes(request_id: str, prompt: str = "hi") -> bytes:
    return msgspec.json.encode(GenerateRequest(id=request_id, model=MODEL, prompt=prompt))


async def test_a_worker_cannot_publish_to_another_services_request_subjects(
    settings: Settings, nats_server: NatsServer
) -> None:
    admin = await nats.connect(nats_server.url)
    await bus.provision(admin.jetstream(), settings)
    generator = Connection(settings, "generator")
    async with generator as nc:
        await nc.publish(subjects.embed_subject("nomic-embed-text"), b"{}")
        await generator.violation("llm.req.embed.")
    assert (await admin.jetstream().stream_info(subjects.REQUEST_STREAM)).state.messages == 0
    await admin.close()


async def test_the_edge_cannot_pull_requests_from_a_workers_consumer(
    settings: Settings, nats_server: NatsServer
) -> None:
    admin = await nats.connect(nats_server.url)
    js = admin.jetstream()
    await bus.provision(js, settings)
    await bus.ensure_consumer(js, settings, "generator", subjects.GENERATE_SUBJECTS)
    await js.publish(subjects.generate_subject(MODEL), request_bytes("queued-0001"))
    edge = Connection(settings, "edge")
    async with edge as nc:
        psub = await nc.jetstream().pull_subscribe_bind("generator", subjects.REQUEST_STREAM)
        with pytest.raises(nats.errors.TimeoutError):
            await psub.fetch(1, timeout=0.5)
        await edge.violation("$JS.API.CONSUMER.MSG.NEXT.LLM_REQ.generator")
    info = await js.consumer_info(subjects.REQUEST_STREAM, "generator")
    assert info.num_pending == 1 and info.delivered.stream_seq == 0  # still queued, never handed out
    await admin.close()


async def test_a_direct_publisher_gets_its_own_events_but_cannot_read_anyone_elses(
    settings: Settings, generator: Generator
) -> None:
    publisher = Connection(settings, "publisher")
    async with publisher as nc:
        inbox = nc.new_inbox()
        assert inbox.startswith("_INBOX.publisher.")
        events = await nc.subscribe(inbox)
        request_id = uuid.uuid4().hex
        ack = await nc.jetstream().publish(
            subjects.generate_subject(MODEL),
            request_bytes(request_id),
            headers={headers.MSG_ID: request_id, headers.REPLY: inbox},
        )
        assert ack.stream == subjects.REQUEST_STREAM
        types: list[str] = []
        async with asyncio.timeout(5):
            while not types or types[-1] != "done":
                types.append(json.loads((await events.next_msg(5)).data)["type"])
        assert types[0] == "start" and types[-1] == "done"

        await nc.subscribe(subjects.EVENT_SUBJECTS)  # everyone's events
        await publisher.violation("llm.out.>")
        await nc.subscribe("_INBOX.edge.>")  # the edge's replies
        await publisher.violation("_INBOX.edge.>")


async def test_a_wrong_password_is_refused(settings: Settings) -> None:
    await refused(settings.nats_url, user="edge", password="not-the-password")


async def refused(url: str, user: str | None = None, password: str | None = None) -> None:
    """A connection the server refuses; the failed client is closed, so it leaves no open socket."""
    nc = Client()
    try:
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
            await nc.connect(
                url, user=user, password=password, max_reconnect_attempts=0, allow_reconnect=False
            )
    finally:
        await nc.close()


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, int]]:
    """A server with permissions on and its monitoring port, to see who connected as whom."""
    monitor = free_port()
    server = NatsServer(tmp_path / "watched", auth=True, extra_args=["-m", str(monitor)])
    await server.astart()
    yield server, monitor
    await server.astop()


async def test_each_service_connects_as_its_own_user(
    watched: tuple[NatsServer, int], settings: Settings
) -> None:
    server, monitor = watched
    own = msgspec.structs.replace(
        settings, nats_url=server.url, nats_credentials=str(server.credentials_file), http_port=free_port()
    )
    generator = Generator(own)
    await generator.start()
    try:
        async with Edge(own), httpx.AsyncClient() as http:
            connz = (await http.get(f"http://127.0.0.1:{monitor}/connz?auth=true")).json()
        users = {c["name"]: c.get("authorized_user") for c in connz["connections"]}
        assert users == {"llmbus-edge": "edge", "llmbus-generator": "generator"}
    finally:
        await generator.stop(grace=0)
    await refused(server.url)  # and nobody gets in without credentials


def test_compose_nats_config_is_generated_from_the_roles_and_valid(tmp_path: Path) -> None:
    auth = REPO / "infra" / "nats" / "auth.conf"
    assert auth.read_text() == nats_auth.compose_conf(), (
        "infra/nats/auth.conf is stale: python -m services.runtime.nats_auth conf > infra/nats/auth.conf"
    )
    env = {**os.environ, **{nats_auth.env_name(role): "secret" for role in nats_auth.ROLES}}
    checked = subprocess.run(
        [server_binary(), "-t", "-c", str(REPO / "infra" / "nats" / "nats.conf")],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- max_payload ---------------------------------------------------------------------------------


@pytest.fixture
async def small_bus(tmp_path: Path, settings: Settings) -> AsyncIterator[Settings]:
    """A server whose max_payload (32 KiB) is below the edge's body limit (64 KiB)."""
    config = tmp_path / "small.conf"
    config.write_text("max_payload: 32768\n")
    server = NatsServer(tmp_path / "small", config_file=config, auth=True, anonymous="admin")
    await server.astart()
    yield msgspec.structs.replace(
        settings,
        nats_url=server.url,
        nats_credentials=str(server.credentials_file),
        http_port=free_port(),
        context_tokens=1_000_000,  # so the prompt is refused for its bytes on the bus, not its tokens
    )
    await server.astop()


async def test_a_prompt_over_the_bus_limit_is_refused_with_413_naming_the_limit(small_bus: Settings) -> None:
    async with Edge(small_bus) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        response = await http.post("/v1/generate", json={"model": MODEL, "prompt": "x" * 40_000})
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == ErrorCode.REQUEST_TOO_LARGE
        assert "32768" in error["message"]
        # An embedding batch too big for one message, the same way.
        batch = ["some words to embed " * 20] * 100
        response = await http.post("/v1/embed", json={"model": "nomic-embed-text", "input": batch})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == ErrorCode.REQUEST_TOO_LARGE
        assert "32768" in response.json()["error"]["message"]
    admin = await nats.connect(small_bus.nats_url)
    try:  # neither was queued
        assert (await admin.jetstream().stream_info(subjects.REQUEST_STREAM)).state.messages == 0
    finally:
        await admin.close()


async def test_a_direct_publisher_cannot_send_more_than_max_payload(small_bus: Settings) -> None:
    publisher = Connection(small_bus, "publisher")
    async with publisher as nc:
        assert nc.max_payload == 32768  # learnt from the server, not assumed
        with pytest.raises(nats.errors.MaxPayloadError):
            await nc.publish(subjects.generate_subject(MODEL), request_bytes("big-00001", "x" * 40_000))


async def test_an_answer_over_max_payload_ends_the_request_with_request_too_large(
    small_bus: Settings,
) -> None:
    async def oversized(job: Job[GenerateRequest]) -> None:
        await job.start(job.request.model)
        await job.token("x" * 40_000)  # one event bigger than any NATS message

    nc = await bus.connect(small_bus, "llmbus-generator")
    worker = Worker(
        nc,
        small_bus,
        service="generator",
        filter_subject=subjects.GENERATE_SUBJECTS,
        request_type=GenerateRequest,
        handler=oversized,
    )
    await worker.start()
    admin = await nats.connect(small_bus.nats_url)
    try:
        events = await admin.subscribe(subjects.event_subject("oversized-1"))
        await admin.jetstream().publish(
            subjects.generate_subject(MODEL),
            request_bytes("oversized-1"),
            headers={headers.MSG_ID: "oversized-1"},
        )
        start = json.loads((await events.next_msg(5)).data)
        error = json.loads((await events.next_msg(5)).data)
        assert start["type"] == "start"
        assert error["type"] == "error" and error["code"] == ErrorCode.REQUEST_TOO_LARGE
        assert "32768" in error["message"]
    finally:
        await worker.stop(grace=0)
        await nc.drain()
        await admin.close()


# -- TLS ----------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl, an EC key: fast to make)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=llmbus-test"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_services_connect_over_tls_with_the_configured_ca(tmp_path: Path, settings: Settings) -> None:
    cert, key = self_signed(tmp_path)
    server = await NatsServer(tmp_path / "tls", auth=True, tls=(cert, key)).astart()
    try:
        secured = msgspec.structs.replace(
            settings,
            nats_url=f"tls://127.0.0.1:{server.port}",
            nats_credentials=str(server.credentials_file),
            nats_tls_ca=str(cert),
        )
        nc = await bus.connect(secured, "llmbus-edge")
        try:
            await bus.provision(nc.jetstream(), secured)  # JetStream works over it, as the edge
            assert nc.connected_url is not None and nc.connected_url.scheme == "tls"
        finally:
            await nc.close()
    finally:
        await server.astop()
