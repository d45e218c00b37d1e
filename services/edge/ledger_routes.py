"""`/v1/usage`, `/v1/stats` and `/v1/history`: the ledger's records over HTTP.

The edge asks the ledger service over NATS (services/runtime/ledger_client.py) and scopes every
query to the caller's tenant; an admin key (or auth off) may name any tenant, or none for all.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, delete, get
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from nats.aio.client import Client

from contracts import ErrorCode, LlmbusError
from contracts.ledger import (
    Erased,
    ForgetQuery,
    Forgotten,
    HistoryPage,
    HistoryQuery,
    RecordRef,
    RequestRecord,
    StatsQuery,
    StatsReport,
    UsageQuery,
    UsageReport,
)
from services.edge.auth import tenant_of
from services.runtime import ledger_client

_GROUPS = ("tenant", "model", "day", "hour")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _scope(request: Request[Any, Any, Any], tenant: str | None) -> str | None:
    """The tenant a query is limited to: the caller's own unless it is an admin."""
    caller = tenant_of(request)
    return tenant if caller.admin else caller.name


def parse_time(value: str | None, name: str) -> float | None:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, f"`{name}` must be Unix seconds or an ISO 8601 date/time"
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def parse_window(value: str) -> float:
    match = _DURATION.match(value.strip())
    if not match or not float(match.group(1)) > 0:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`window` must be a duration such as 3600, 90m, 24h or 7d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


@get("/v1/usage", summary="Tokens, requests and cost, grouped by tenant, model, day or hour (JSON or CSV)")
async def usage(
    request: Request[Any, Any, Any],
    nc: NamedDependency[Client],
    *,
    group_by: FromQuery[str] = "tenant,model,day",
    since: FromQuery[str | None] = None,
    until: FromQuery[str | None] = None,
    tenant: FromQuery[str | None] = None,
    format: FromQuery[str] = "json",
) -> Response[bytes]:
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    if not groups or any(g not in _GROUPS for g in groups):
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, f"`group_by` is a comma-separated list of {', '.join(_GROUPS)}"
        )
    if format not in ("json", "csv"):
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`format` is json or csv")
    query = UsageQuery(
        group_by=groups,  # type: ignore[arg-type]
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
        tenant=_scope(request, tenant),
    )
    report = await ledger_client.call(nc, "usage", query, UsageReport)
    if format == "csv":
        return Response(_csv(report), media_type="text/csv; charset=utf-8")
    return Response(msgspec.json.encode(report), media_type="application/json")


def _csv(report: UsageReport) -> bytes:
    out = io.StringIO()
    columns = [
        *report.group_by,
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost",
    ]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in report.rows:
        writer.writerow([getattr(row, c) for c in columns])
    return out.getvalue().encode()


@get(
    "/v1/stats",
    summary="Per model: requests, errors by code, p50/p95/p99 of queue time, TTFT, duration, tokens/s",
)
async def stats(
    request: Request[Any, Any, Any],
    nc: NamedDependency[Client],
    window: FromQuery[str] = "1h",
    model: FromQuery[str | None] = None,
    tenant: FromQuery[str | None] = None,
) -> StatsReport:
    query = StatsQuery(window_s=parse_window(window), model=model or None, tenant=_scope(request, tenant))
    return await ledger_client.call(nc, "stats", query, StatsReport)


@get("/v1/history", summary="Requests, newest first, paged (`next` -> `cursor`), filtered")
async def history(
    request: Request[Any, Any, Any],
    nc: NamedDependency[Client],
    *,
    limit: FromQuery[int] = 50,
    cursor: FromQuery[str | None] = None,
    model: FromQuery[str | None] = None,
    outcome: FromQuery[str | None] = None,
    since: FromQuery[str | None] = None,
    until: FromQuery[str | None] = None,
    tenant: FromQuery[str | None] = None,
) -> HistoryPage:
    if not 1 <= limit <= 500:
        raise LlmbusError(ErrorCode.BAD_REQUEST, "`limit` must be 1 to 500")
    query = HistoryQuery(
        limit=limit,
        cursor=cursor or None,
        model=model or None,
        outcome=outcome or None,
        since=parse_time(since, "since"),
        until=parse_time(until, "until"),
        tenant=_scope(request, tenant),
    )
    return await ledger_client.call(nc, "history", query, HistoryPage)


@get("/v1/history/{request_id:str}", summary="One request's record in the ledger")
async def history_record(
    request: Request[Any, Any, Any], nc: NamedDependency[Client], request_id: FromPath[str]
) -> RequestRecord:
    ref = RecordRef(request_id=request_id, tenant=_scope(request, None))
    return await ledger_client.call(nc, "record", ref, RequestRecord)


@delete(
    "/v1/history/{request_id:str}",
    summary="Erase one request's record and its prompt and answer (`content_only`: those only)",
    status_code=200,
)
async def erase_record(
    request: Request[Any, Any, Any],
    nc: NamedDependency[Client],
    request_id: FromPath[str],
    content_only: FromQuery[bool] = False,
) -> Erased:
    ref = RecordRef(request_id=request_id, tenant=_scope(request, None), content_only=content_only)
    return await ledger_client.call(nc, "erase", ref, Erased)


@delete(
    "/v1/history",
    summary="Erase every record of a tenant or an API key (`key_id`); `content_only`: prompts and answers",
    status_code=200,
)
async def erase_records(
    request: Request[Any, Any, Any],
    nc: NamedDependency[Client],
    *,
    tenant: FromQuery[str | None] = None,
    key_id: FromQuery[str | None] = None,
    content_only: FromQuery[bool] = False,
) -> Forgotten:
    """A non-admin key erases within its own tenant only (all of it, or one of its keys)."""
    query = ForgetQuery(tenant=_scope(request, tenant), key_id=key_id or None, content_only=content_only)
    return await ledger_client.call(nc, "forget", query, Forgotten)


ROUTES = [usage, stats, history, history_record, erase_record, erase_records]
