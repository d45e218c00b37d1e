"""The ledger: one row per request in a real database (SQLite, and a real PostgreSQL server), its
read API through the edge, budgets, and no request lost or counted twice across crashes,
redeliveries and a database that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest

from contracts import headers, subjects
from contracts.ledger import HistoryQuery, RecordRef, StatsQuery, UsageQuery
from contracts.models import UsageEvent
from services.edge.tenants import hash_key
from services.generator.main import Generator
from services.ledger import queries
from services.ledger.main import LedgerService
from services.ledger.store import Store, database_url, row
from services.runtime import bus
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.postgres import Postgres

MODEL = "llama3.2:1b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
KEYS = {"a": "llmbus_key_of_tenant_a", "b": "llmbus_key_of_tenant_b", "admin": "llmbus_key_of_the_admin"}


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url("", str(tmp_path / "data"))
    server: Postgres = request.getfixturevalue("postgres_server")
    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(server.port),
            "-U",
            "llmbus",
            "-d",
            "postgres",
            "-c",
            f"CREATE DATABASE {name}",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PATH": f"{server.bin}:{os.environ.get('PATH', '')}"},
    )
    return database_url(server.url.rsplit("/", 1)[0] + "/" + name, "")


def event(request_id: str, tenant: str = "a", at: float | None = None, **more: object) -> UsageEvent:
    fields: dict[str, object] = {
        "model": MODEL,
        "kind": "generate",
        "request_id": request_id,
        "at": time.time() if at is None else at,
        "outcome": "done",
        "duration_ms": 120.0,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "tenant": tenant,
        "ttft_ms": 20.0,
        "queued_ms": 3.0,
        "tokens_per_s": 40.0,
    }
    fields.update(more)
    return msgspec.convert(fields, UsageEvent)


async def test_rows_are_written_once_per_request_id_and_totals_count_each_once(database: str) -> None:
    store = await Store.open(database)
    try:
        now = time.time()
        first = [row(event(f"req-{i:05d}", tenant="a" if i % 2 else "b"), 0.5, now) for i in range(10)]
        new, spent = await store.record(first)
        assert new == 10
        assert {s.tenant: s.day_tokens for s in spent} == {"a": 75, "b": 75}
        # Redelivered (a crash after the commit, before the acks), plus one new row.
        new, spent = await store.record([*first[:4], row(event("req-99999", tenant="a"), 0.5, now)])
        assert new == 1
        assert {s.tenant: s.day_tokens for s in spent} == {"a": 90}
        assert (await store.spend_of(["b"]))[0].month_tokens == 75
        # A second open migrates nothing and keeps the rows (Alembic at every start).
        await store.close()
        store = await Store.open(database)
        report = await queries.usage(store.engine, UsageQuery(group_by=["tenant"]))
        assert [(r.tenant, r.requests, r.total_tokens, r.cost) for r in report.rows] == [
            ("a", 6, 90, 3.0),
            ("b", 5, 75, 2.5),
        ]
    finally:
        await store.close()


async def test_queries_group_page_and_erase(database: str) -> None:
    store = await Store.open(database)
    try:
        base = 1_700_000_000.0  # 2023-11-14T22:13:20Z
        rows = [
            row(
                event(
                    f"req-{i:05d}", at=base + i * 600, outcome="done" if i % 4 else "backend_error", ttft_ms=i
                ),
                0,
                base,
            )
            for i in range(12)
        ]
        await store.record(rows)
        hourly = await queries.usage(
            store.engine, UsageQuery(group_by=["hour"], since=base, until=base + 6600)
        )
        assert [(r.hour, r.requests) for r in hourly.rows] == [("2023-11-14T22", 5), ("2023-11-14T23", 6)]
        stats = await queries.stats(store.engine, StatsQuery(window_s=time.time() - base + 60))
        (model,) = stats.models
        assert model.requests == 12
        assert model.errors == {"backend_error": 3}
        assert model.ttft_ms is not None
        assert model.ttft_ms.p50 == 6
        assert model.ttft_ms.p99 == 11
        seen, cursor = [], None
        while True:
            page = await queries.history(store.engine, HistoryQuery(limit=5, cursor=cursor))
            seen += [item.request_id for item in page.items]
            if page.next is None:
                break
            cursor = page.next
        assert seen == [f"req-{i:05d}" for i in reversed(range(12))]
        other = await queries.history(store.engine, HistoryQuery(tenant="b"))
        assert other.items == []
        await queries.erase(store.engine, RecordRef(request_id="req-00003", tenant="a"))
        with pytest.raises(Exception, match="no request"):
            await queries.record(store.engine, RecordRef(request_id="req-00003"))
    finally:
        await store.close()


def _tenants(path: Path, a_budget: str = "") -> str:
    path.write_text(
        f'[tenants.a]\nkeys = ["{hash_key(KEYS["a"])}"]\n{a_budget}\n'
        f'[tenants.b]\nkeys = ["{hash_key(KEYS["b"])}"]\ntokens_per_day = 1000000\n'
        f'[tenants.admin]\nkeys = ["{hash_key(KEYS["admin"])}"]\nadmin = true\n'
    )
    return str(path)


@contextlib.asynccontextmanager
async def ledger(settings: Settings) -> AsyncIterator[LedgerService]:
    service = LedgerService(settings)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def _wait_for(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = await check() if asyncio.iscoroutinefunction(check) else check()  # type: ignore[operator]
        if result:
            return
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_every_request_through_the_gateway_gets_a_row_usage_stats_and_history(
    settings: Settings, tmp_path: Path, generator: Generator, database: str
) -> None:
    settings = msgspec.structs.replace(
        settings, auth="on", tenants_file=_tenants(tmp_path / "tenants.toml"), database_url=database
    )
    async with (
        ledger(settings),
        Edge(settings) as edge,
        httpx.AsyncClient(base_url=edge.url, timeout=10) as http,
    ):
        for path, body, who in [
            ("/v1/chat", CHAT, "a"),
            ("/openai/v1/chat/completions", {**CHAT, "stream": False}, "a"),
            ("/ollama/api/chat", {**CHAT, "stream": False}, "b"),
        ]:
            answer = await http.post(path, json=body, headers=bearer(who))
            assert answer.status_code == 200, answer.text

        async def recorded() -> bool:
            page = await http.get("/v1/history", headers=bearer("admin"))
            return len(page.json()["items"]) == 3

        await _wait_for(recorded)
        everything = (await http.get("/v1/history", headers=bearer("admin"))).json()["items"]
        by_api = {item["api"]: item["request_id"] for item in everything}
        ids = [by_api["native"], by_api["openai"], by_api["ollama"]]
        record = (await http.get(f"/v1/history/{ids[0]}", headers=bearer("a"))).json()
        assert record["tenant"] == "a"
        assert record["key_id"] == hash_key(KEYS["a"])[7:19]
        assert KEYS["a"] not in str(record)
        assert record["api"] == "native"
        assert record["requested_model"] == MODEL
        assert record["model"] == MODEL
        assert record["outcome"] == "done"
        assert record["total_tokens"] == record["prompt_tokens"] + record["completion_tokens"] > 0
        assert record["ttft_ms"] is not None and record["queued_ms"] is not None
        assert record["host"].startswith("127.0.0.1:")
        assert record["attempts"] == 1
        # Each tenant sees its own requests only; the admin sees all.
        own = (await http.get("/v1/history", headers=bearer("a"))).json()["items"]
        assert {r["api"] for r in own} == {"native", "openai"}
        assert (await http.get(f"/v1/history/{ids[2]}", headers=bearer("a"))).status_code == 404
        usage = (await http.get("/v1/usage?group_by=tenant", headers=bearer("admin"))).json()
        assert [(r["tenant"], r["requests"]) for r in usage["rows"]] == [("a", 2), ("b", 1)]
        as_csv = await http.get("/v1/usage?group_by=tenant,model&format=csv", headers=bearer("b"))
        assert as_csv.headers["content-type"].startswith("text/csv")
        assert as_csv.text.splitlines()[0].startswith("tenant,model,requests,errors")
        assert len(as_csv.text.splitlines()) == 2  # b's row only
        stats = (await http.get("/v1/stats?window=1h", headers=bearer("admin"))).json()
        assert stats["models"][0]["requests"] == 3
        erased = await http.delete(f"/v1/history/{ids[2]}", headers=bearer("b"))
        assert erased.json() == {"request_id": ids[2], "erased": True}
        bad = await http.get("/v1/usage?group_by=week", headers=bearer("a"))
        assert bad.status_code == 400


async def test_without_a_ledger_the_read_api_is_503_and_requests_still_run(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    assert (await client.post("/v1/chat", json=CHAT)).status_code == 200
    refused = await client.get("/v1/usage")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "ledger_unavailable"
    assert "retry-after" in refused.headers


async def test_a_tenant_at_its_daily_budget_gets_429_another_is_unaffected_and_redelivery_counts_once(
    settings: Settings, tmp_path: Path, generator: Generator
) -> None:
    settings = msgspec.structs.replace(
        settings, auth="on", tenants_file=_tenants(tmp_path / "tenants.toml", "tokens_per_day = 1")
    )
    async with (
        ledger(settings) as service,
        Edge(settings) as edge,
        httpx.AsyncClient(base_url=edge.url, timeout=10) as http,
    ):
        first = await http.post("/v1/chat", json=CHAT, headers=bearer("a"))
        assert first.status_code == 200
        admission = edge.app.state.dispatcher.admission

        async def seen() -> bool:
            spent = admission.spend.spend.get("a") if admission.spend else None
            return spent is not None and spent.day_tokens > 0

        await _wait_for(seen)
        refused = await http.post("/v1/chat", json=CHAT, headers=bearer("a"))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"
        retry_after = int(refused.headers["retry-after"])
        assert 0 < retry_after <= 86400
        assert abs(time.time() + retry_after - (int(time.time()) // 86400 + 1) * 86400) < 5
        assert (await http.post("/v1/chat", json=CHAT, headers=bearer("b"))).status_code == 200
        # A usage event delivered again (a worker or the stream repeating it) changes nothing.
        spent = admission.spend.spend["a"].day_tokens
        nc = await bus.connect(settings, "llmbus-admin", role="admin")
        try:
            record = (await http.get("/v1/history", headers=bearer("a"))).json()["items"][0]
            again = event(record["request_id"], tenant="a", prompt_tokens=500)
            await nc.jetstream().publish(
                subjects.usage_subject(MODEL),
                msgspec.json.encode(again),
                headers={headers.MSG_ID: "other-id"},
            )
            before = service.consumer.recorded

            async def consumed() -> bool:
                info = await nc.jetstream().consumer_info(subjects.USAGE_STREAM, "ledger")
                return info.num_ack_pending == 0 and info.num_pending == 0

            await _wait_for(consumed)
            assert service.consumer.recorded == before
            assert (await service.store.spend_of(["a"]))[0].day_tokens == spent  # type: ignore[union-attr]
        finally:
            await nc.close()


def _ledger_process(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "LLMBUS_LOG_FORMAT": "json"}
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "ledger"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _publish_usage(settings: Settings, ids: list[str]) -> None:
    nc = await bus.connect(settings, "llmbus-generator", role="generator")
    try:
        for request_id in ids:
            await nc.publish(
                subjects.usage_subject(MODEL),
                msgspec.json.encode(event(request_id, tenant="a")),
                headers={headers.MSG_ID: f"{request_id}.usage"},
            )
        await nc.flush()
    finally:
        await nc.close()


async def _count(database: str) -> tuple[int, int]:
    store = await Store.open(database)
    try:
        report = await queries.usage(store.engine, UsageQuery(group_by=["tenant"]))
        spent = (await store.spend_of(["a"]))[0].day_tokens
        return (report.rows[0].requests if report.rows else 0), spent
    finally:
        await store.close()


async def test_a_ledger_killed_mid_batch_catches_up_counting_every_request_once(
    settings: Settings, database: str
) -> None:
    settings = msgspec.structs.replace(settings, database_url=database, ledger_batch=64, ack_wait_s=1.0)
    proc = _ledger_process(settings)
    try:
        nc = await bus.connect(settings, "llmbus-admin", role="admin")
        try:

            async def provisioned() -> bool:
                with contextlib.suppress(Exception):
                    await nc.jetstream().consumer_info(subjects.USAGE_STREAM, "ledger")
                    return True
                return False

            await _wait_for(provisioned, 30)
            ids = [f"crash-{i:06d}" for i in range(3000)]
            await _publish_usage(settings, ids)

            async def started() -> bool:
                info = await nc.jetstream().consumer_info(subjects.USAGE_STREAM, "ledger")
                return info.delivered.consumer_seq > 100

            await _wait_for(started)
            proc.send_signal(signal.SIGKILL)  # mid-batch: whatever it fetched and did not ack comes again
            proc.wait(10)
            await _publish_usage(settings, ids[:500])  # repeats inside the dedupe window: dropped
            proc = _ledger_process(settings)

            async def caught_up() -> bool:
                info = await nc.jetstream().consumer_info(subjects.USAGE_STREAM, "ledger")
                return info.num_pending == 0 and info.num_ack_pending == 0

            await _wait_for(caught_up, 60)
        finally:
            await nc.close()
        assert await _count(database) == (3000, 3000 * 15)
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_database_going_away_is_retried_and_the_gateway_keeps_serving(
    settings: Settings, generator: Generator, postgres_server: Postgres, tmp_path: Path
) -> None:
    name = f"gone_{os.getpid()}"
    subprocess.run(  # noqa: ASYNC221 - once, before anything runs
        [
            str(postgres_server.bin / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(postgres_server.port),
            "-U",
            "llmbus",
            "-d",
            "postgres",
            "-c",
            f"CREATE DATABASE {name}",
        ],
        check=True,
        capture_output=True,
    )
    url = database_url(postgres_server.url.rsplit("/", 1)[0] + "/" + name, "")
    settings = msgspec.structs.replace(settings, database_url=url)
    async with (
        ledger(settings) as service,
        Edge(settings) as edge,
        httpx.AsyncClient(base_url=edge.url, timeout=10) as http,
    ):
        assert (await http.post("/v1/chat", json=CHAT)).status_code == 200
        await _wait_for(lambda: service.consumer.recorded == 1)
        postgres_server.stop()
        try:
            for _ in range(5):
                answer = await http.post("/v1/chat", json=CHAT)
                assert answer.status_code == 200
            down = await http.get("/v1/usage")
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "ledger_unavailable"
            await asyncio.sleep(1.0)
        finally:
            postgres_server.start()
        await _wait_for(lambda: service.consumer.recorded == 6, 30)
        usage = (await http.get("/v1/usage?group_by=model")).json()
        assert usage["rows"][0]["requests"] == 6
