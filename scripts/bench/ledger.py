"""`--ledger`: the llmbus contender once more with the ledger running (contender `llmbus-ledger`).

For each load level the ledger is started before that contender's run (it creates `LLM_USAGE`, so
usage events are stored from then on) and stopped after it, with the stream deleted, so the plain
`llmbus` rows of the same run are without it: the gateway's latency with the ledger on vs off.
After the run the ledger is asked for its row lag (a request's end to its row's commit, p50/p99)
over that level's rows, on `$SRV.STATS.llmbus-ledger` (services/ledger/consumer.py `lag_stats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import nats

from contracts import subjects
from scripts.bench.procs import PYTHON, Group, Proc

STATS_SUBJECT = "$SRV.STATS.llmbus-ledger"


class Ledger:
    """Starts and stops the ledger process of the `llmbus-ledger` contender."""

    def __init__(self, env: dict[str, str], work: Path, repo: Path, nats_url: str, edge_url: str) -> None:
        self.env = env
        self.work = work
        self.repo = repo
        self.nats_url = nats_url
        self.edge_url = edge_url
        self.proc: Proc | None = None
        self.runs = 0

    async def start(self, database_url: str | None) -> Proc:
        self.runs += 1
        env = {**self.env, "LLMBUS_DATA_DIR": str(self.work / f"ledger-{self.runs}")}
        if database_url:
            env["LLMBUS_DATABASE_URL"] = database_url
        args = [PYTHON, "-m", "services.cli", "ledger"]
        self.proc = Proc("ledger", args, self.work, env=env, cwd=self.repo)
        self.proc.start()
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=5) as http:
            while (await http.get(f"{self.edge_url}/v1/usage")).status_code != 200:  # ledger answers
                self.proc.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the ledger did not answer within 60 s:\n{self.proc.tail()}")
                await asyncio.sleep(0.1)
        return self.proc

    async def lag(self, rows: int, patience: float = 60.0) -> dict[str, Any]:
        """The ledger's figures once it wrote `rows` rows (or stopped writing for 2 s)."""
        nc = await nats.connect(self.nats_url)
        try:
            deadline = time.monotonic() + patience
            last, still_since = -1, time.monotonic()
            while True:
                stats = await _stats(nc)
                if stats["recorded"] != last:
                    last, still_since = stats["recorded"], time.monotonic()
                now = time.monotonic()
                if stats["recorded"] >= rows or now - still_since > 2 or now > deadline:
                    return {**stats, "expected": rows}
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    async def stop(self) -> None:
        """Stops the ledger and deletes `LLM_USAGE`: the next plain run stores no usage events."""
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        nc = await nats.connect(self.nats_url)
        try:
            with contextlib.suppress(Exception):  # not there: nothing to delete
                await nc.jetstream().delete_stream(subjects.USAGE_STREAM)
        finally:
            await nc.close()


async def _stats(nc: Any) -> dict[str, Any]:
    reply = await nc.request(STATS_SUBJECT, b"", timeout=5)
    endpoints = json.loads(reply.data).get("endpoints") or [{}]
    data: dict[str, Any] = endpoints[0].get("data") or {}
    return data


def attach(group: Group, parts: dict[str, Group], proc: Proc) -> None:
    """Counts the ledger process in the contender's CPU and memory figures."""
    group.procs = [p for p in group.procs if p.name != "ledger"] + [proc]
    parts["ledger"] = Group([proc])


def print_lags(extra: dict[str, Any]) -> None:
    print("\nledger row lag (a request's end to its row's commit) with the ledger on (llmbus-ledger):")
    for concurrency, lag in extra.items():
        print(
            f"  {concurrency} streams: {lag['recorded']} rows, lag p50 {lag['lag_p50_ms']} ms, "
            f"p99 {lag['lag_p99_ms']} ms, max {lag['lag_max_ms']} ms"
        )
