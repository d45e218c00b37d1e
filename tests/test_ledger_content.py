"""Prompts and answers in the ledger (`LLMBUS_LEDGER_CONTENT=on`): stored with the row, streamed
answers whole, cut to the size limit, deleted after the retention period, erased per request, per
tenant and per API key (HTTP and `llmbus erase`), on SQLite and a real PostgreSQL; and the
migration that adds them upgrades a database of the first schema."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from alembic import command
from alembic.config import Config
from nats.aio.client import Client
from nats.aio.msg import Msg
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from contracts import GenerateRequest, Message, subjects
from contracts.ledger import ForgetQuery, RecordRef
from contracts.models import UsageContent, UsageEvent
from services.generator.main import Generator
from services.ledger import queries
from services.ledger.store import MIGRATIONS, Store, content_row, database_url, row
from services.runtime import bus
from services.runtime.settings import Settings
from services.runtime.transcript import content
from tests import test_delivery, test_ledger
from tests.answers import full_answer
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events
from tests.test_ledger import (
    CHAT,
    MODEL,
    _tenants,
    _wait_for,
    bearer,
    event,
    ledger,
)

database = test_ledger.database  # the fixture: SQLite, and a real PostgreSQL


def said(request_id: str, tenant: str = "a", key_id: str = "k1", at: float | None = None) -> object:
    return event(
        request_id,
        tenant=tenant,
        key_id=key_id,
        at=at,
        content=UsageContent(
            prompt=f'[{{"role":"user","content":"q {request_id}"}}]', answer=f"a {request_id}"
        ),
    )


async def _store(store: Store, events: list[object]) -> int:
    now = time.time()
    rows = [row(e, 0.0, now) for e in events]  # type: ignore[arg-type]
    contents = [c for e in events if (c := content_row(e)) is not None]  # type: ignore[arg-type]
    new, _ = await store.record(rows, contents)
    return new


async def test_content_is_kept_with_its_row_purged_after_retention_and_erased(database: str) -> None:
    store = await Store.open(database)
    try:
        old = time.time() - 7200
        assert await _store(store, [said("r1"), said("r2", key_id="k2"), said("r3", tenant="b")]) == 3
        assert await _store(store, [said("old", at=old)]) == 1
        found = await queries.record(store.engine, RecordRef(request_id="r1"))
        assert found.content == UsageContent(prompt='[{"role":"user","content":"q r1"}]', answer="a r1")
        # Redelivered: no second row, no second content.
        assert await _store(store, [said("r1")]) == 0
        # Retention: only what ended before the cut goes, and the row stays.
        assert await store.purge(time.time() - 3600) == 1
        kept = await queries.record(store.engine, RecordRef(request_id="old"))
        assert kept.content is None
        # One request's content only: the usage row stays.
        _, seqs = await queries.erase(store.engine, RecordRef(request_id="r2", content_only=True))
        assert seqs == []  # stored without a stream sequence
        assert (await queries.record(store.engine, RecordRef(request_id="r2"))).content is None
        with pytest.raises(Exception, match="no content"):
            await queries.erase(store.engine, RecordRef(request_id="r2", content_only=True))
        # Another tenant's request is not found under this tenant.
        with pytest.raises(Exception, match="no request"):
            await queries.erase(store.engine, RecordRef(request_id="r3", tenant="a"))
        # An erased request's content does not come back with a redelivered event.
        await queries.erase(store.engine, RecordRef(request_id="r1"))
        assert await _store(store, [said("r4")]) == 1
        # Per API key, then per tenant.
        gone, _ = await queries.forget(store.engine, ForgetQuery(tenant="a", key_id="k1"))
        assert (gone.requests, gone.contents) == (2, 1)  # old (content purged) and r4
        gone, _ = await queries.forget(store.engine, ForgetQuery(tenant="a"))
        assert (gone.requests, gone.contents) == (1, 0)  # r2
        gone, _ = await queries.forget(store.engine, ForgetQuery(tenant="b", content_only=True))
        assert (gone.requests, gone.contents) == (0, 1)
        assert (await queries.record(store.engine, RecordRef(request_id="r3"))).content is None
        with pytest.raises(Exception, match="tenant"):
            await queries.forget(store.engine, ForgetQuery())
        # The totals keep what was spent: r1, r2, old and r4.
        assert (await store.spend_of(["a"]))[0].month_tokens == 4 * 15
    finally:
        await store.close()


async def test_a_database_of_the_first_schema_is_migrated(database: str) -> None:
    store = Store(create_async_engine(database))

    def first(connection: object) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")

    async with store.engine.begin() as conn:
        await conn.run_sync(first)
    await store.close()
    store = await Store.open(database)
    try:
        async with store.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        assert "ledger_content" in tables
        assert await _store(store, [said("m1")]) == 1
    finally:
        await store.close()


def test_each_field_is_cut_to_the_limit_on_a_character_boundary() -> None:
    request = GenerateRequest(
        id="r",
        model=MODEL,
        system="be brief",
        messages=[Message(role="user", content="é" * 100, images=["x"])],
    )
    whole = content(request, "ü" * 10, 1000)
    assert not whole.truncated
    assert '"images":1' in whole.prompt and whole.prompt.startswith('[{"role":"system"')
    cut = content(request, "ü" * 10, 9)  # 2 bytes a character: 4 whole ones fit
    assert cut.truncated
    assert cut.answer == "üüüü"
    assert len(cut.prompt.encode()) <= 9


async def test_the_gateway_keeps_streamed_answers_whole_and_erases_them(
    settings: Settings, tmp_path: Path
) -> None:
    settings = msgspec.structs.replace(
        settings,
        auth="on",
        tenants_file=_tenants(tmp_path / "tenants.toml"),
        ledger_content="on",
        ledger_content_max_bytes=4096,
        database_url=database_url("", str(tmp_path / "data")),
    )
    generator = Generator(settings)
    await generator.start()
    try:
        async with (
            ledger(settings),
            Edge(settings) as edge,
            httpx.AsyncClient(base_url=edge.url, timeout=10) as http,
        ):
            body = {**CHAT, "messages": [{"role": "user", "content": "tell me"}], "stream": True}
            async with http.stream("POST", "/v1/chat", json=body, headers=bearer("a")) as response:
                events = [e async for e in sse_events(response)]
            streamed = "".join(e.data["text"] for e in events if e.event == "token")
            (start,) = [e.data for e in events if e.event == "start"]
            plain = await http.post("/ollama/api/chat", json={**CHAT, "stream": False}, headers=bearer("b"))
            assert plain.status_code == 200

            async def recorded() -> bool:
                page = await http.get("/v1/history", headers=bearer("admin"))
                return len(page.json()["items"]) == 2

            await _wait_for(recorded)
            record = (await http.get(f"/v1/history/{start['request_id']}", headers=bearer("a"))).json()
            assert record["content"]["answer"] == streamed != ""
            assert '"content":"tell me"' in record["content"]["prompt"]
            assert "truncated" not in record["content"]
            listed = (await http.get("/v1/history", headers=bearer("a"))).json()["items"]
            assert "content" not in listed[0]  # pages stay small: content on the record only
            assert await _usage_events(settings) == 2
            # Tenant a erases its content, keeping the rows; it cannot reach b's.
            gone = await http.delete("/v1/history?content_only=true&tenant=b", headers=bearer("a"))
            assert gone.json() == {"requests": 0, "contents": 1}  # its own tenant, whatever it names
            assert await _usage_events(settings) == 1  # its usage event, which held the prompt too
            record = (await http.get(f"/v1/history/{start['request_id']}", headers=bearer("a"))).json()
            assert "content" not in record
            b_items = (await http.get("/v1/history", headers=bearer("b"))).json()["items"]
            b_record = (await http.get(f"/v1/history/{b_items[0]['request_id']}", headers=bearer("b"))).json()
            assert b_record["content"]["answer"] == plain.json()["message"]["content"]
            # The admin erases tenant b from the command line.
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "services.cli", "erase", "--tenant", "b"],
                env={**os.environ, **settings.to_env()},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
            assert "erased 1 usage rows, 1 prompts and answers" in result.stdout
            assert (await http.get("/v1/history", headers=bearer("b"))).json()["items"] == []
            assert await _usage_events(settings) == 0
            bad = await http.delete("/v1/history", headers=bearer("admin"))
            assert bad.status_code == 400
    finally:
        await generator.stop(grace=0)


async def _usage_events(settings: Settings) -> int:
    """How many usage events LLM_USAGE holds."""
    nc = await bus.connect(settings, "llmbus-admin", role="admin")
    try:
        return int((await nc.jetstream().stream_info(subjects.USAGE_STREAM)).state.messages)
    finally:
        await nc.close()


async def test_the_ledger_purges_expired_content_periodically(settings: Settings, tmp_path: Path) -> None:
    settings = msgspec.structs.replace(
        settings,
        ledger_content="on",
        ledger_content_retention_s=2.0,
        database_url=database_url("", str(tmp_path / "data")),
    )
    generator = Generator(settings)
    await generator.start()
    try:
        async with (
            ledger(settings) as service,
            Edge(settings) as edge,
            httpx.AsyncClient(base_url=edge.url, timeout=10) as http,
        ):
            assert (await http.post("/v1/chat", json=CHAT)).status_code == 200
            await _wait_for(lambda: service.consumer.recorded == 1)
            (item,) = (await http.get("/v1/history")).json()["items"]
            assert "content" in (await http.get(f"/v1/history/{item['request_id']}")).json()

            async def purged() -> bool:
                record = (await http.get(f"/v1/history/{item['request_id']}")).json()
                return "content" not in record

            await _wait_for(purged, 10)  # retention 2 s, a purge every second
            assert (await http.get(f"/v1/history/{item['request_id']}")).status_code == 200  # row kept
    finally:
        await generator.stop(grace=0)


nc = test_delivery.nc  # the fixture: a NATS connection with the streams provisioned


async def test_an_answer_taken_over_after_a_crash_is_kept_whole(
    settings: Settings, nc: Client, fake_ollama: FakeOllama
) -> None:
    settings = test_delivery.fast(settings, ledger_content="on")
    fake_ollama.config.tokens = 12
    answer = await full_answer(fake_ollama.url, MODEL, test_delivery.MESSAGES)
    usage: asyncio.Queue[UsageEvent] = asyncio.Queue()

    async def put(msg: Msg) -> None:
        usage.put_nowait(msgspec.json.decode(msg.data, type=UsageEvent))

    await nc.subscribe(subjects.USAGE_SUBJECTS, cb=put)
    body: dict[str, Any] = {"id": uuid.uuid4().hex, **test_delivery.CHAT}
    events = await test_delivery.follow(nc, body["id"])
    await test_delivery.crashed_first_attempt(nc, settings, body, answer[:5])
    gen = await test_delivery.running(settings)
    try:
        await test_delivery.until_terminal(events)
        async with asyncio.timeout(10):
            event = await usage.get()
    finally:
        await gen.stop(grace=0)
    assert event.attempt == 2
    assert event.content is not None
    assert event.content.answer == "".join(answer)  # the first attempt's 5 tokens and the rest
    assert '"content":"tell me about rivers"' in event.content.prompt


async def test_content_too_big_for_one_message_is_left_out_and_the_row_still_comes(
    settings: Settings, nc: Client
) -> None:
    settings = msgspec.structs.replace(
        settings, ledger_content="on", ledger_content_max_bytes=4 << 20, max_body_bytes=1 << 20
    )
    await bus.provision(nc.jetstream(), settings, update=True)  # LLM_REQ takes the big request
    usage: asyncio.Queue[UsageEvent] = asyncio.Queue()

    async def put(msg: Msg) -> None:
        usage.put_nowait(msgspec.json.decode(msg.data, type=UsageEvent))

    await nc.subscribe(subjects.USAGE_SUBJECTS, cb=put)
    # 300,000 quotes: 600 kB as a request, twice that as the usage event's (JSON in JSON) prompt.
    body = {"id": uuid.uuid4().hex, "model": MODEL, "messages": [{"role": "user", "content": '"' * 300_000}]}
    events = await test_delivery.follow(nc, body["id"])
    gen = await test_delivery.running(settings)
    try:
        await test_delivery.publish(nc, body)
        await test_delivery.until_terminal(events)
        async with asyncio.timeout(10):
            event = await usage.get()
    finally:
        await gen.stop(grace=0)
    assert event.outcome == "done" and event.completion_tokens > 0
    assert event.content == UsageContent(prompt="", answer="", truncated=True)
