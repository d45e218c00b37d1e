"""Ledger write throughput: rows/s through `Store.record` in batches, SQLite and PostgreSQL.

    python scripts/ledger_throughput.py [--rows 50000] [--batch 512] [--postgres URL]

Without `--postgres` it starts a throw-away cluster (tests/postgres.py) when PostgreSQL is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.models import UsageEvent
from services.ledger.store import Store, database_url, row


async def measure(url: str, rows: int, batch: int) -> float:
    store = await Store.open(url)
    try:
        now = time.time()
        events = [
            UsageEvent(
                model="llama3.2:1b", kind="generate", request_id=f"bench-{i:09d}", at=now, outcome="done",
                duration_ms=500.0, prompt_tokens=30, completion_tokens=200, tenant=f"t{i % 8}",
                ttft_ms=40.0, queued_ms=2.0, tokens_per_s=80.0,
            )
            for i in range(rows)
        ]  # fmt: skip
        started = time.perf_counter()
        for i in range(0, rows, batch):
            await store.record([row(e, 0.0, now) for e in events[i : i + batch]])
        return rows / (time.perf_counter() - started)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--postgres")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rate = asyncio.run(measure(database_url("", tmp), args.rows, args.batch))
        print(f"sqlite (WAL): {rate:,.0f} rows/s ({args.rows} rows, batches of {args.batch})")
    url, server = args.postgres, None
    if url is None:
        from tests.postgres import Postgres, ensure_installed

        bin_dir = ensure_installed()
        if bin_dir is None:
            print("postgresql: not installed, skipped")
            return
        server = Postgres(bin_dir).init()
        url = server.url
    try:
        rate = asyncio.run(measure(database_url(url, ""), args.rows, args.batch))
        print(f"postgresql: {rate:,.0f} rows/s ({args.rows} rows, batches of {args.batch})")
    finally:
        if server is not None:
            server.destroy()


if __name__ == "__main__":
    main()
