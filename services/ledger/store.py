"""The ledger's database: SQLite by default (a WAL file under the data directory), PostgreSQL via
`LLMBUS_DATABASE_URL`, through SQLAlchemy Core's async engine; Alembic migrations run at open.

`record` is the only writer: one transaction per batch inserts the rows whose request id is new
(`ON CONFLICT DO NOTHING ... RETURNING`) and adds exactly those to the tenants' running totals, so
a redelivered usage event changes nothing, and a batch is either all in or not at all.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import delete, event, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from contracts.ledger import Spend
from contracts.models import UsageEvent
from services.ledger.schema import content, requests, spend

MIGRATIONS = Path(__file__).parent / "migrations"
# Two ledgers starting at once against one PostgreSQL must not both run a migration.
_MIGRATION_LOCK = 7_240_120
PURGE_CHUNK = 5000  # rows per delete: a long purge never holds the writer for long


def database_url(configured: str, data_dir: str) -> str:
    """The SQLAlchemy URL: `configured` with an async driver, else a SQLite file in `data_dir`."""
    if not configured:
        path = Path(data_dir).resolve() / "ledger.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{path}"
    url = make_url(configured)
    driver = {
        "postgres": "postgresql+asyncpg",
        "postgresql": "postgresql+asyncpg",
        "sqlite": "sqlite+aiosqlite",
    }
    if url.drivername in driver:
        url = url.set(drivername=driver[url.drivername])
    return url.render_as_string(hide_password=False)


def display(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def day_of(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def hour_of(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H", time.gmtime(at))


def month_of(at: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(at))


def row(event: UsageEvent, cost: float, recorded_at: float) -> dict[str, Any]:
    return {
        "request_id": event.request_id,
        "tenant": event.tenant,
        "key_id": event.key_id,
        "api": event.api,
        "kind": event.kind,
        "requested_model": event.requested_model or event.model,
        "model": event.model,
        "route": event.route,
        "host": event.host,
        "outcome": event.outcome,
        "cancelled": event.outcome == "cancelled",
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "cost": cost,
        "queued_ms": event.queued_ms,
        "ttft_ms": event.ttft_ms,
        "duration_ms": event.duration_ms,
        "tokens_per_s": event.tokens_per_s,
        "attempts": event.attempt,
        "trace_id": event.trace_id,
        "accepted_at": event.accepted_at,
        "ended_at": event.at,
        "recorded_at": recorded_at,
        "day": day_of(event.at),
        "hour": hour_of(event.at),
    }


def content_row(event: UsageEvent, stream_seq: int | None = None) -> dict[str, Any] | None:
    """The prompt and answer of a request, if its usage event carries them (`stream_seq`: the
    event's sequence in LLM_USAGE, deleted with the content when it is erased)."""
    if event.content is None:
        return None
    return {
        "request_id": event.request_id,
        "tenant": event.tenant,
        "key_id": event.key_id,
        "ended_at": event.at,
        "prompt": event.content.prompt,
        "answer": event.content.answer,
        "truncated": event.content.truncated,
        "stream_seq": stream_seq,
    }


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._insert = (postgresql if self.dialect == "postgresql" else sqlite).insert

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connects and migrates to the newest schema (raises when the database is unreachable)."""
        engine = create_async_engine(url, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        store = cls(engine)
        try:
            await store.migrate()
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def migrate(self) -> None:
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
            await conn.run_sync(_upgrade)

    async def close(self) -> None:
        await self.engine.dispose()

    async def record(
        self, rows: Iterable[dict[str, Any]], contents: Iterable[dict[str, Any]] = ()
    ) -> tuple[int, list[Spend]]:
        """Inserts the new rows and counts them in their tenants' totals, in one transaction;
        `contents` (prompts and answers) are kept for the rows that were new only, so an erased
        request's content never comes back with a redelivered event.

        Returns how many were new, and the touched tenants' totals for the current day and month.
        """
        by_id = {r["request_id"]: r for r in rows}
        if not by_id:
            return 0, []
        async with self.engine.begin() as conn:
            insert = (
                self._insert(requests)
                .on_conflict_do_nothing(index_elements=["request_id"])
                .returning(requests.c.request_id)
            )
            new = {r[0] for r in await conn.execute(insert, list(by_id.values()))}
            kept = [c for c in contents if c["request_id"] in new]
            if kept:
                await conn.execute(self._insert(content).on_conflict_do_nothing(), kept)
            totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
            for request_id in new:
                r = by_id[request_id]
                if not r["tenant"]:
                    continue
                for period in (f"d:{r['day']}", f"m:{r['day'][:7]}"):
                    total = totals[r["tenant"], period]
                    total[0] += r["total_tokens"]
                    total[1] += r["cost"]
            if totals:
                upsert = self._insert(spend)
                upsert = upsert.on_conflict_do_update(
                    index_elements=["tenant", "period"],
                    set_={
                        "tokens": spend.c.tokens + upsert.excluded.tokens,
                        "cost": spend.c.cost + upsert.excluded.cost,
                    },
                )
                params = [
                    {"tenant": t, "period": p, "tokens": int(v[0]), "cost": v[1]}
                    for (t, p), v in totals.items()
                ]
                await conn.execute(upsert, params)
            spent = await self._spend(conn, sorted({t for t, _ in totals}))
        return len(new), spent

    async def purge(self, before: float) -> int:
        """Deletes the prompts and answers of requests that ended before `before`; how many."""
        purged = 0
        while True:
            oldest = select(content.c.request_id).where(content.c.ended_at < before).limit(PURGE_CHUNK)
            async with self.engine.begin() as conn:
                result = await conn.execute(delete(content).where(content.c.request_id.in_(oldest)))
            purged += result.rowcount
            if result.rowcount < PURGE_CHUNK:
                return purged

    async def spend_of(self, tenants: list[str]) -> list[Spend]:
        async with self.engine.connect() as conn:
            return await self._spend(conn, tenants)

    async def tenants(self) -> list[str]:
        """Every tenant with a total this month (the ledger republishes them at start)."""
        now = time.time()
        async with self.engine.connect() as conn:
            result = await conn.execute(select(spend.c.tenant).where(spend.c.period == f"m:{month_of(now)}"))
            return [r[0] for r in result]

    @staticmethod
    async def _spend(conn: Any, tenants: list[str]) -> list[Spend]:
        if not tenants:
            return []
        now = time.time()
        day, month = day_of(now), month_of(now)
        result = await conn.execute(
            select(spend.c.tenant, spend.c.period, spend.c.tokens, spend.c.cost).where(
                spend.c.tenant.in_(tenants), spend.c.period.in_([f"d:{day}", f"m:{month}"])
            )
        )
        found = {(t, p): (int(tokens), float(cost)) for t, p, tokens, cost in result}
        return [
            Spend(
                tenant=t,
                day=day,
                day_tokens=found.get((t, f"d:{day}"), (0, 0.0))[0],
                day_cost=found.get((t, f"d:{day}"), (0, 0.0))[1],
                month=month,
                month_tokens=found.get((t, f"m:{month}"), (0, 0.0))[0],
                month_cost=found.get((t, f"m:{month}"), (0, 0.0))[1],
                at=now,
            )
            for t in tenants
        ]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers (the read API) never block the writer; NORMAL is durable across a process crash.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _upgrade(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
