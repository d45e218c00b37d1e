"""The permission matrix: every service's NATS user tries every operation that would let it read
or destroy another service's work, and the server refuses all but what the design allows
(services/runtime/nats_auth.py; the table is docs/reliability.md's "Permission matrix").

The expected table is written out here, not derived from nats_auth.py, so a change to a role
that widens it fails this test.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import httpx
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from contracts import GenerateRequest, headers, subjects
from services.runtime import bus
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings
from tests.conftest import Edge

USERS = ("edge", "generator", "embedder", "classifier", "janitor", "dlq", "publisher", "batcher")
# The edge and the batcher (which runs a batch's lines as an edge would) publish and follow requests.
EDGES = {"edge", "batcher"}
WORKERS = {"generator", "embedder", "classifier"}
API = "$JS.API"
REQUEST_ID = "victim-request-0001"

# operation -> (publish or subscribe, subject, the users allowed it); everyone else is refused.
MATRIX: dict[str, tuple[str, str, set[str]]] = {
    "read a queued request by sequence": ("pub", f"{API}.STREAM.MSG.GET.LLM_REQ", {"edge"}),  # /v1/queue
    "delete a queued request": ("pub", f"{API}.STREAM.MSG.DELETE.LLM_REQ", {"edge"}),
    "update LLM_REQ (e.g. max_age 1 s)": ("pub", f"{API}.STREAM.UPDATE.LLM_REQ", set()),
    "update LLM_OUT": ("pub", f"{API}.STREAM.UPDATE.LLM_OUT", set()),
    "update LLM_DLQ": ("pub", f"{API}.STREAM.UPDATE.LLM_DLQ", set()),
    "purge LLM_REQ": ("pub", f"{API}.STREAM.PURGE.LLM_REQ", set()),
    "delete the stream LLM_DLQ": ("pub", f"{API}.STREAM.DELETE.LLM_DLQ", set()),
    "delete a consumer": ("pub", f"{API}.CONSUMER.DELETE.LLM_REQ.generator", set()),
    "create LLM_OUT when missing": ("pub", f"{API}.STREAM.CREATE.LLM_OUT", EDGES | {"dlq"} | WORKERS),
    "read a dead letter": ("pub", f"{API}.STREAM.MSG.GET.LLM_DLQ", {"dlq"}),
    "delete a dead letter": ("pub", f"{API}.STREAM.MSG.DELETE.LLM_DLQ", {"dlq"}),
    "pull from the generator's consumer": (
        "pub",
        f"{API}.CONSUMER.MSG.NEXT.LLM_REQ.generator",
        {"generator"},
    ),
    "pull from the embedder's consumer": ("pub", f"{API}.CONSUMER.MSG.NEXT.LLM_REQ.embedder", {"embedder"}),
    "pull from the classifier's consumer": (
        "pub",
        f"{API}.CONSUMER.MSG.NEXT.LLM_REQ.classifier",
        {"classifier"},
    ),
    "ack on the embedder's consumer": ("pub", "$JS.ACK.LLM_REQ.embedder.1.1.1.1.0", {"embedder"}),
    "read a request's stored events": ("pub", f"{API}.DIRECT.GET.LLM_OUT", EDGES | WORKERS),
    "publish an event on llm.out.<id>": ("pub", f"llm.out.{REQUEST_ID}", EDGES | WORKERS),
    "forge an accepted record llm.out.<id>.accepted": ("pub", f"llm.out.{REQUEST_ID}.accepted", EDGES),
    "publish into the edge's inbox": ("pub", "_INBOX.edge.x", {"janitor"}),
    "publish into the dlq tool's inbox": ("pub", "_INBOX.dlq.x", set()),
    "publish into a direct publisher's inbox": ("pub", "_INBOX.publisher.x", WORKERS),
    "publish a generate request": ("pub", "llm.req.generate.m", {"edge", "classifier", "dlq", "publisher"}),
    "publish an embed request": ("pub", "llm.req.embed.m", {"edge", "dlq", "publisher"}),
    # The batcher's lines wait in the batch lane, never on the interactive subjects.
    "publish a batch-lane request": (
        "pub",
        "llm.req.batch.generate.m",
        EDGES | {"classifier", "dlq", "publisher"},
    ),
    "pull from the generators' batch lane": (
        "pub",
        f"{API}.CONSUMER.MSG.NEXT.LLM_REQ.generator-batch",
        {"generator"},
    ),
    "pull from the embedders' batch lane": (
        "pub",
        f"{API}.CONSUMER.MSG.NEXT.LLM_REQ.embedder-batch",
        {"embedder"},
    ),
    "write the model inventory": ("pub", "$KV.llm_models.host.model", {"janitor"}),
    "subscribe to every request's events": ("sub", "llm.out.>", EDGES),
    "pull from the batch queue": ("pub", f"{API}.CONSUMER.MSG.NEXT.LLM_BATCH.batcher", {"batcher"}),
    "ack a batch": ("pub", "$JS.ACK.LLM_BATCH.batcher.1.1.1.1.0", {"batcher"}),
    "update the batch queue": ("pub", f"{API}.STREAM.UPDATE.LLM_BATCH", set()),
    "purge the batch queue": ("pub", f"{API}.STREAM.PURGE.LLM_BATCH", set()),
    "delete the batch queue": ("pub", f"{API}.STREAM.DELETE.LLM_BATCH", set()),
    "update the batch files' store": ("pub", f"{API}.STREAM.UPDATE.OBJ_llm_files", set()),
    "delete the batch files' store": ("pub", f"{API}.STREAM.DELETE.OBJ_llm_files", set()),
    "subscribe to the batcher's inbox": ("sub", "_INBOX.batcher.>", {"batcher"}),
    "subscribe to the edge's inbox": ("sub", "_INBOX.edge.>", {"edge"}),
    "subscribe to JetStream advisories": ("sub", "$JS.EVENT.ADVISORY.>", set()),
}


async def refused_subjects(settings: Settings, user: str) -> set[str]:
    """Tries every operation of the matrix as `user`; the subjects the server refused."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await bus.connect(settings, f"llmbus-{user}", error_cb=on_error)
    try:
        for kind, subject, _ in MATRIX.values():
            if kind == "pub":
                await nc.publish(subject, b"{}")
            else:
                await nc.subscribe(subject)
        await nc.flush()
        await asyncio.sleep(0.3)  # the server's -ERRs arrive after the PONG
    finally:
        await nc.close()
    return {subject for _, subject, _ in MATRIX.values() if any(f'"{subject.lower()}"' in e for e in errors)}


async def test_every_user_is_refused_every_operation_outside_its_role(settings: Settings) -> None:
    # No stream exists: an allowed publish changes nothing (a JetStream API call without a
    # reply subject is not answered), a refused one draws `permissions violation`.
    wrong: list[str] = []
    for user in USERS:
        refused = await refused_subjects(settings, user)
        for operation, (_, subject, allowed) in MATRIX.items():
            if (subject in refused) == (user in allowed):
                wrong.append(
                    f"{user}: {operation} ({subject}) {'refused' if subject in refused else 'allowed'}"
                )
    assert not wrong, "\n".join(wrong)


# -- the attacks of issue 23, end to end, as a worker's user ----------------------------------------


@pytest.fixture
async def admin(nats_server: NatsServer, settings: Settings) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)  # the anonymous user is admin in the tests
    await bus.provision(nc.jetstream(), settings)
    yield nc
    await nc.close()


async def queue_one(admin: Client) -> str:
    request_id = uuid.uuid4().hex
    body = msgspec.json.encode(GenerateRequest(id=request_id, model="m", prompt="a secret prompt"))
    await admin.jetstream().publish("llm.req.generate.m", body, headers={headers.MSG_ID: request_id})
    return request_id


@pytest.mark.parametrize("user", sorted(WORKERS))
async def test_a_worker_can_neither_read_nor_destroy_the_queue_or_the_dead_letters(
    settings: Settings, admin: Client, user: str
) -> None:
    await queue_one(admin)
    await admin.jetstream().publish(subjects.dead_letter_subject("generator"), b"{}")
    nc = await bus.connect(settings, f"llmbus-{user}")
    js = nc.jetstream(timeout=0.5)
    try:
        with pytest.raises(nats.errors.Error):  # refused: the API never hears it, so no answer
            await js.get_msg(subjects.REQUEST_STREAM, seq=1)
        with pytest.raises(nats.errors.Error):
            await js.delete_msg(subjects.REQUEST_STREAM, 1)
        for stream in (subjects.REQUEST_STREAM, subjects.DEAD_LETTER_STREAM):
            with pytest.raises(nats.errors.Error):
                await js.update_stream(StreamConfig(name=stream, subjects=[f"x.{stream}"], max_age=1))
            with pytest.raises(nats.errors.Error):
                await js.purge_stream(stream)
    finally:
        await nc.close()
    ajs = admin.jetstream()
    assert (await ajs.stream_info(subjects.REQUEST_STREAM)).state.messages == 1  # still queued
    assert (await ajs.stream_info(subjects.DEAD_LETTER_STREAM)).state.messages == 1
    assert (await ajs.stream_info(subjects.REQUEST_STREAM)).config.max_age == 0


async def test_a_publisher_cannot_take_over_another_requests_accepted_record(
    settings: Settings, generator: object
) -> None:
    """A direct publisher naming `llm.out.<victim>.accepted` as its reply: refused by the worker
    (bad_request, dead-lettered), and the victim's owner still follows its request."""
    async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        body = {"model": "llama3.2:1b", "prompt": "hi", "stream": "deferred"}
        accepted = await http.post("/v1/generate", json=body)
        assert accepted.status_code == 202
        victim = accepted.json()["request_id"]
        nc = await bus.connect(settings, "llmbus-publisher")
        try:
            attacker = uuid.uuid4().hex
            request = GenerateRequest(id=attacker, model="llama3.2:1b", prompt="hi")
            await nc.jetstream().publish(
                subjects.generate_subject("llama3.2:1b"),
                msgspec.json.encode(request),
                headers={headers.MSG_ID: attacker, headers.REPLY: subjects.accepted_subject(victim)},
            )
        finally:
            await nc.close()
        async with asyncio.timeout(10):  # the attack is dead-lettered ...
            admin = await nats.connect(settings.nats_url)
            try:
                while (await admin.jetstream().stream_info(subjects.DEAD_LETTER_STREAM)).state.messages < 1:
                    await asyncio.sleep(0.05)
                record = await admin.jetstream().get_last_msg(
                    subjects.EVENT_STREAM, subjects.accepted_subject(victim)
                )
            finally:
                await admin.close()
        assert json.loads(record.data or b"{}")["request_id"] == victim  # ... the record intact
        events = await http.get(f"/v1/requests/{victim}/events")
        assert events.status_code == 200 and "event: done" in events.text
