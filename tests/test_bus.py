"""What other backends see when they use the bus directly, and how the worker treats bad messages."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import httpx
import msgspec
import nats
import pytest

from contracts import GenerateRequest, Message, headers, subjects
from services.generator.main import Generator
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


async def _events(sub: nats.aio.subscription.Subscription, timeout: float = 5) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    while True:
        event = json.loads((await sub.next_msg(timeout)).data)
        out.append(event)
        if event["type"] in ("done", "error"):
            return out


async def test_direct_publisher_gets_the_same_events(nats_server: NatsServer, generator: Generator) -> None:
    nc = await nats.connect(nats_server.url)
    request = GenerateRequest(id="direct-0001", model="llama3.2:1b", messages=[Message("user", "hi")])
    sub = await nc.subscribe(subjects.event_subject(request.id))
    await nc.jetstream().publish(
        subjects.generate_subject(request.model),
        msgspec.json.encode(request),
        headers={headers.MSG_ID: request.id},
    )
    events = await _events(sub)
    await nc.close()
    assert [e["type"] for e in events] == ["start"] + ["token"] * 8 + ["done"]


async def test_malformed_message_is_terminated_and_the_sender_told(
    nats_server: NatsServer, generator: Generator
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    reply = "_INBOX.publisher.replies.1"  # a request's own llm.out.<id> or a publisher's inbox only
    sub = await nc.subscribe(reply)
    await js.publish("llm.req.generate.llama3%2E2:1b", b'{"id": "x"', headers={headers.REPLY: reply})
    await js.publish(
        "llm.req.generate.llama3%2E2:1b",
        b'{"id": "abcdefgh", "model": "m", "messages": []}',
        headers={headers.REPLY: reply},
    )
    first, second = json.loads((await sub.next_msg(5)).data), json.loads((await sub.next_msg(5)).data)
    assert first["type"] == second["type"] == "error"
    assert first["code"] == second["code"] == "bad_request"
    assert "empty" in second["message"]
    await asyncio.sleep(0.3)
    info = await js.consumer_info(subjects.REQUEST_STREAM, "generator")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0  # terminated, never redelivered
    assert (await js.stream_info(subjects.REQUEST_STREAM)).state.messages == 0
    await nc.close()


async def test_same_msg_id_runs_once(nats_server: NatsServer, generator: Generator) -> None:
    nc = await nats.connect(nats_server.url)
    request = GenerateRequest(id="dedupe-0001", model="llama3.2:1b", prompt="once")
    sub = await nc.subscribe(subjects.event_subject(request.id))
    for _ in range(3):
        ack = await nc.jetstream().publish(
            subjects.generate_subject(request.model),
            msgspec.json.encode(request),
            headers={headers.MSG_ID: request.id},
        )
    assert ack.duplicate
    await _events(sub)
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(0.5)  # no second start: JetStream de-duplicated the retries
    await nc.close()


async def test_unreachable_backend_fails_fast_with_backend_unavailable(
    nats_server: NatsServer, settings: Settings
) -> None:
    from tests.conftest import Edge

    dead = msgspec.structs.replace(settings, ollama_url="http://127.0.0.1:9")  # nothing listens on port 9
    gen = Generator(dead)
    await gen.start()
    try:
        async with Edge(dead) as edge, httpx.AsyncClient(base_url=edge.url) as http:
            body = {"model": "llama3.2:1b", "prompt": "hi"}
            response = await http.post("/v1/generate", json=body, timeout=10)
    finally:
        await gen.stop(grace=0)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "backend_unavailable"


async def test_readiness_needs_a_live_generator(settings: Settings) -> None:
    from tests.conftest import Edge

    async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url) as http:
        assert (await http.get("/health/live")).status_code == 200
        not_ready = await http.get("/health/ready")
        assert not_ready.status_code == 503 and not_ready.json()["generators"] is False
        gen = Generator(settings)
        await gen.start()
        try:
            ready = await http.get("/health/ready")
        finally:
            await gen.stop(grace=0)
        assert ready.status_code == 200, ready.json()
        assert (await http.get("/schema/openapi.json")).status_code == 200


async def test_readme_nats_example_runs(nats_server: NatsServer, generator: Generator) -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- nats-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README lost its nats-py example"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        match.group(1),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "NATS_URL": nats_server.url,
            "NATS_PASSWORD": nats_server.credentials["publisher"],  # it connects as `publisher`
        },
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    assert len(stdout.split()) == 8  # the fake's eight tokens, printed as they arrived
