"""The ledger's read side: usage grouped by tenant/model/day/hour, per-model statistics, history.

Percentiles are computed here from the window's values (one indexed range scan), the same way on
SQLite, which has no percentile function, and on PostgreSQL.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec
from sqlalchemy import Select, and_, case, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ErrorCode, LlmbusError
from contracts.ledger import (
    Erased,
    ForgetQuery,
    Forgotten,
    HistoryPage,
    HistoryQuery,
    ModelStats,
    Percentiles,
    RecordRef,
    RequestRecord,
    StatsQuery,
    StatsReport,
    UsageQuery,
    UsageReport,
    UsageRow,
)
from contracts.models import UsageContent
from services.ledger.schema import content, requests

MAX_PAGE = 500
MAX_STATS_ROWS = 200_000  # the newest rows of a window that statistics are computed over
_RECORD_FIELDS = [name for name in RequestRecord.__struct_fields__ if name != "content"]


async def usage(engine: AsyncEngine, query: UsageQuery) -> UsageReport:
    keys = list(dict.fromkeys(query.group_by))
    columns = [requests.c[key] for key in keys]
    errors = func.sum(case((requests.c.outcome != "done", 1), else_=0))
    stmt = select(
        *columns,
        func.count().label("requests"),
        errors.label("errors"),
        func.coalesce(func.sum(requests.c.prompt_tokens), 0),
        func.coalesce(func.sum(requests.c.completion_tokens), 0),
        func.coalesce(func.sum(requests.c.total_tokens), 0),
        func.coalesce(func.sum(requests.c.cost), 0.0),
    )
    stmt = _range(stmt, query.tenant, query.since, query.until).group_by(*columns).order_by(*columns)
    rows = []
    async with engine.connect() as conn:
        for r in await conn.execute(stmt):
            values = dict(zip(keys, r[: len(keys)], strict=True))
            tail: Any = r[len(keys) :]
            requests_, errors_, prompt, completion, total, cost = tail
            rows.append(
                UsageRow(
                    **values,
                    requests=int(requests_),
                    errors=int(errors_ or 0),
                    prompt_tokens=int(prompt),
                    completion_tokens=int(completion),
                    total_tokens=int(total),
                    cost=round(float(cost), 6),
                )
            )
    return UsageReport(group_by=keys, since=query.since, until=query.until, rows=rows)


async def stats(engine: AsyncEngine, query: StatsQuery) -> StatsReport:
    if not query.window_s > 0:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`window` must be a positive number of seconds")
    until = time.time()
    since = until - query.window_s
    c = requests.c
    stmt: Any = select(c.model, c.outcome, c.queued_ms, c.ttft_ms, c.duration_ms, c.tokens_per_s)
    stmt = _range(stmt, query.tenant, since, None)
    if query.model:
        stmt = stmt.where(c.model == query.model)
    stmt = stmt.order_by(c.ended_at.desc()).limit(MAX_STATS_ROWS)
    per_model: dict[str, list[Any]] = {}
    async with engine.connect() as conn:
        for r in await conn.execute(stmt):
            per_model.setdefault(r[0], []).append(r)
    models = []
    for model, rows in sorted(per_model.items()):
        errors: dict[str, int] = {}
        for r in rows:
            if r[1] != "done":
                errors[r[1]] = errors.get(r[1], 0) + 1
        models.append(
            ModelStats(
                model=model,
                requests=len(rows),
                errors=errors,
                queued_ms=_percentiles(r[2] for r in rows),
                ttft_ms=_percentiles(r[3] for r in rows),
                duration_ms=_percentiles(r[4] for r in rows),
                tokens_per_s=_percentiles(r[5] for r in rows),
            )
        )
    return StatsReport(since=since, until=until, models=models)


async def history(engine: AsyncEngine, query: HistoryQuery) -> HistoryPage:
    limit = max(1, min(query.limit, MAX_PAGE))
    c = requests.c
    stmt = _range(select(requests), query.tenant, query.since, query.until)
    if query.model:
        stmt = stmt.where(c.model == query.model)
    if query.outcome:
        stmt = stmt.where(c.outcome == query.outcome)
    if query.cursor:
        ended_at, request_id = _decode_cursor(query.cursor)
        stmt = stmt.where(or_(c.ended_at < ended_at, and_(c.ended_at == ended_at, c.request_id < request_id)))
    stmt = stmt.order_by(c.ended_at.desc(), c.request_id.desc()).limit(limit + 1)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).mappings().all()
    items = [_record(r) for r in rows[:limit]]
    following = None
    if len(rows) > limit:
        last = items[-1]
        following = _encode_cursor(last.ended_at, last.request_id)
    return HistoryPage(items=items, next=following)


async def record(engine: AsyncEngine, ref: RecordRef) -> RequestRecord:
    stmt = select(requests).where(requests.c.request_id == ref.request_id)
    if ref.tenant is not None:
        stmt = stmt.where(requests.c.tenant == ref.tenant)
    c = content.c
    async with engine.connect() as conn:
        found = (await conn.execute(stmt)).mappings().first()
        said = None
        if found is not None:
            query = select(c.prompt, c.answer, c.truncated).where(c.request_id == ref.request_id)
            said = (await conn.execute(query)).first()
    if found is None:
        raise LlmbusError(ErrorCode.NOT_FOUND, f"no request {ref.request_id!r} in the ledger")
    out = _record(found)
    if said is not None:
        out.content = UsageContent(prompt=said[0], answer=said[1], truncated=bool(said[2]))
    return out


async def erase(engine: AsyncEngine, ref: RecordRef) -> tuple[Erased, list[int]]:
    """Deletes the request's prompt and answer and, unless `content_only`, its row (its totals
    stay: what was spent was spent). Also returns the erased content's LLM_USAGE sequences."""
    async with engine.begin() as conn:
        stmt = delete(content).where(content.c.request_id == ref.request_id)
        if ref.tenant is not None:
            stmt = stmt.where(content.c.tenant == ref.tenant)
        seqs = [r[0] for r in await conn.execute(stmt.returning(content.c.stream_seq))]
        erased = len(seqs)
        if not ref.content_only:
            rows = delete(requests).where(requests.c.request_id == ref.request_id)
            if ref.tenant is not None:
                rows = rows.where(requests.c.tenant == ref.tenant)
            erased += (await conn.execute(rows)).rowcount
    if not erased:
        what = "content" if ref.content_only else "request"
        raise LlmbusError(ErrorCode.NOT_FOUND, f"no {what} {ref.request_id!r} in the ledger")
    return Erased(request_id=ref.request_id, erased=True), [s for s in seqs if s is not None]


async def forget(engine: AsyncEngine, query: ForgetQuery) -> tuple[Forgotten, list[int]]:
    """Deletes every prompt and answer, and unless `content_only` every row, of a tenant or an
    API key; the totals stay. Also returns the erased content's LLM_USAGE sequences."""
    if not query.tenant and not query.key_id:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "name a `tenant` or a `key_id` to erase")
    rows = 0
    async with engine.begin() as conn:
        stmt = delete(content)
        if query.tenant:
            stmt = stmt.where(content.c.tenant == query.tenant)
        if query.key_id:
            stmt = stmt.where(content.c.key_id == query.key_id)
        seqs = [r[0] for r in await conn.execute(stmt.returning(content.c.stream_seq))]
        if not query.content_only:
            gone = delete(requests)
            if query.tenant:
                gone = gone.where(requests.c.tenant == query.tenant)
            if query.key_id:
                gone = gone.where(requests.c.key_id == query.key_id)
            rows = (await conn.execute(gone)).rowcount
    return Forgotten(requests=rows, contents=len(seqs)), [s for s in seqs if s is not None]


def _range(stmt: Select[Any], tenant: str | None, since: float | None, until: float | None) -> Select[Any]:
    if tenant is not None:
        stmt = stmt.where(requests.c.tenant == tenant)
    if since is not None:
        stmt = stmt.where(requests.c.ended_at >= since)
    if until is not None:
        stmt = stmt.where(requests.c.ended_at < until)
    return stmt


def _record(r: Any) -> RequestRecord:
    return RequestRecord(**{name: r[name] for name in _RECORD_FIELDS})


def _percentiles(values: Any) -> Percentiles | None:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None

    def at(q: float) -> float:
        return round(float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]), 3)

    return Percentiles(p50=at(0.50), p95=at(0.95), p99=at(0.99))


class _Cursor(msgspec.Struct, array_like=True):
    ended_at: float
    request_id: str


def _encode_cursor(ended_at: float, request_id: str) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(_Cursor(ended_at, request_id))).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        parsed = msgspec.json.decode(base64.urlsafe_b64decode(cursor.encode()), type=_Cursor)
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, "invalid `cursor`: pass a `next` from a history page"
        ) from None
    return parsed.ended_at, parsed.request_id
