"""`llmbus usage` and `llmbus stats`: the ledger's records as tables; `llmbus erase`: delete records
(a request's, a tenant's or an API key's), or only their prompts and answers. Asked over NATS (admin
user)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from contracts import LlmbusError
from contracts.ledger import (
    Erased,
    ForgetQuery,
    Forgotten,
    RecordRef,
    StatsQuery,
    StatsReport,
    UsageQuery,
    UsageReport,
)
from services.edge.ledger_routes import parse_time, parse_window
from services.runtime import bus, ledger_client
from services.runtime.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = sub.add_parser(
        "usage", help="tokens, requests and cost per tenant, model, day or hour (the ledger)"
    )
    usage.add_argument("--by", default="tenant,model,day", help="comma-separated: tenant, model, day, hour")
    usage.add_argument("--since", help="Unix seconds or ISO date/time (UTC); default: the last 7 days")
    usage.add_argument("--until", help="Unix seconds or ISO date/time (UTC)")
    usage.add_argument("--tenant", help="only this tenant")
    stats = sub.add_parser("stats", help="per model: requests, errors, p50/p95/p99 latencies (the ledger)")
    stats.add_argument("--window", default="1h", help="the last 3600, 90m, 24h, 7d ...")
    stats.add_argument("--model", help="only this model")
    stats.add_argument("--tenant", help="only this tenant")
    erase = sub.add_parser(
        "erase", help="erase a request's record, or all of a tenant's or an API key's (the ledger)"
    )
    erase.add_argument("request_id", nargs="?", help="the request to erase")
    erase.add_argument(
        "--tenant", help="every request of this tenant (with a request id: that request, if the tenant's)"
    )
    erase.add_argument("--key-id", help="every request of this API key (12 hex digits, as rows show it)")
    erase.add_argument(
        "--content-only", action="store_true", help="only the prompts and answers; keep the usage rows"
    )


def main(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_run(args, settings))
    except LlmbusError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    nc = await bus.connect(settings, "llmbus-admin")
    try:
        if args.command == "erase":
            return await _erase(nc, args)
        if args.command == "usage":
            since = parse_time(args.since, "since")
            query = UsageQuery(
                group_by=[g.strip() for g in args.by.split(",") if g.strip()],
                since=since if since is not None else time.time() - 7 * 86400,
                until=parse_time(args.until, "until"),
                tenant=args.tenant,
            )
            report = await ledger_client.call(nc, "usage", query, UsageReport)
            columns = [*report.group_by, "requests", "errors", "prompt_tokens", "completion_tokens", "cost"]
            print(table(columns, [[getattr(r, c) for c in columns] for r in report.rows]))
        else:
            stats_query = StatsQuery(window_s=parse_window(args.window), model=args.model, tenant=args.tenant)
            stats = await ledger_client.call(nc, "stats", stats_query, StatsReport)
            columns = ["model", "requests", "errors", "queue p50/p95/p99 ms", "ttft p50/p95/p99 ms"]
            columns += ["duration p50/p95/p99 ms", "tokens/s p50"]
            rows = [
                [
                    m.model,
                    m.requests,
                    ", ".join(f"{code} {n}" for code, n in sorted(m.errors.items())) or "0",
                    _p(m.queued_ms),
                    _p(m.ttft_ms),
                    _p(m.duration_ms),
                    "-" if m.tokens_per_s is None else f"{m.tokens_per_s.p50:g}",
                ]
                for m in stats.models
            ]
            print(table(columns, rows))
    finally:
        await nc.close()
    return 0


async def _erase(nc: Any, args: argparse.Namespace) -> int:
    if args.request_id:
        ref = RecordRef(request_id=args.request_id, tenant=args.tenant, content_only=args.content_only)
        await ledger_client.call(nc, "erase", ref, Erased)
        print(f"erased {args.request_id}" + (" (prompt and answer)" if args.content_only else ""))
        return 0
    if not args.tenant and not args.key_id:
        print("name a request id, --tenant or --key-id", file=sys.stderr)
        return 2
    query = ForgetQuery(tenant=args.tenant, key_id=args.key_id, content_only=args.content_only)
    gone = await ledger_client.call(nc, "forget", query, Forgotten)
    print(f"erased {gone.requests} usage rows, {gone.contents} prompts and answers")
    return 0


def _p(p: Any) -> str:
    return "-" if p is None else f"{p.p50:g} / {p.p95:g} / {p.p99:g}"


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in columns], *[["" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
