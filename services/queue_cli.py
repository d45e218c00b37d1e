"""`llmbus queue`: per model, what waits and runs, as a table (services/runtime/queue_stats.py,
over NATS as the admin user: the same numbers as `GET /v1/queue` on any edge)."""

from __future__ import annotations

import argparse
import asyncio

import msgspec

from services.ledger.cli import table
from services.runtime import bus
from services.runtime.queue_stats import QueueStats
from services.runtime.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = sub.add_parser("queue", help="per model: waiting, running, generators, oldest wait, rates")
    command.add_argument("--json", action="store_true", help="the report as JSON (GET /v1/queue's shape)")


def main(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(show(settings, as_json=args.json))


async def show(settings: Settings, *, as_json: bool = False) -> int:
    nc = await bus.connect(settings, "llmbus-admin")
    try:
        report = await QueueStats(nc).report()
    finally:
        await nc.close()
    if as_json:
        print(msgspec.json.encode(report).decode())
        return 0
    columns = ["model", "waiting", "running", "consumer", "generators", "concurrency"]
    columns += ["oldest wait s", "accepted/min", "completed/min"]
    rows = [
        [
            m.model,
            m.waiting,
            m.running,
            m.consumer or "(none)",
            m.generators,
            m.concurrency,
            None if m.oldest_waiting_s is None else f"{m.oldest_waiting_s:.1f}",
            m.accepted_per_min,
            m.completed_per_min,
        ]
        for m in report.models
    ]
    print(table(columns, rows) if rows else "nothing queued, running or accepted in the last minute")
    return 0
