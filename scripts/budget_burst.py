"""Budget overshoot under a burst: how far a tenant's spend goes past its daily token budget when
many requests arrive at once (docs/ledger.md "Budgets").

A real nats-server, the fake Ollama (`--tokens` tokens an answer, `--answer-ms` each), a generator,
the ledger and `--edges` edges, each its own process, with LLMBUS_AUTH=on. Tenant `small` has
`tokens_per_day = --budget`; `--burst` concurrent requests are fired at once (spread over the
edges), the ledger is waited for, and then a second burst checks that the tenant is refused. Prints
one JSON object: admitted and refused requests, tokens spent, and the overshoot (spent - budget).

    python scripts/budget_burst.py [--burst 64] [--budget 200] [--edges 1] [--num-predict 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.bench.procs import Proc  # noqa: E402
from services.edge.tenants import hash_key  # noqa: E402
from services.runtime.nats_server import NatsServer, free_port  # noqa: E402
from services.runtime.settings import Settings  # noqa: E402

KEYS = {"small": "llmbus_burst_tenant_small", "admin": "llmbus_burst_admin"}
BODY = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hello"}]}


def tenants_toml(budget: int) -> str:
    return (
        f'[tenants.small]\nkeys = ["{hash_key(KEYS["small"])}"]\ntokens_per_day = {budget}\n'
        f'[tenants.admin]\nkeys = ["{hash_key(KEYS["admin"])}"]\nadmin = true\n'
    )


async def burst(urls: list[str], key: str, n: int, body: dict[str, Any] = BODY) -> Counter[int]:
    """`n` requests at once, round-robin over the edges; the status codes they got."""
    https = [httpx.AsyncClient(base_url=url, timeout=60) for url in urls]
    auth = {"Authorization": f"Bearer {key}"}
    try:
        answers = await asyncio.gather(
            *(https[i % len(https)].post("/v1/chat", json=body, headers=auth) for i in range(n))
        )
    finally:
        for http in https:
            await http.aclose()
    return Counter(a.status_code for a in answers)


async def spent(url: str, admin_key: str, tenant: str, requests: int, wait_s: float = 30.0) -> int:
    """The tenant's tokens in the ledger, once it has recorded `requests` requests."""
    deadline = time.monotonic() + wait_s
    auth = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while True:
            report = (await http.get(f"/v1/usage?group_by=tenant&tenant={tenant}", headers=auth)).json()
            rows = report.get("rows", [])
            if rows and rows[0]["requests"] >= requests:
                return int(rows[0]["total_tokens"])
            if time.monotonic() > deadline:
                raise SystemExit(f"the ledger recorded {rows} after {wait_s:g} s, not {requests} requests")
            await asyncio.sleep(0.1)


async def measure(urls: list[str], budget: int, n: int, body: dict[str, Any] = BODY) -> dict[str, Any]:
    first = await burst(urls, KEYS["small"], n, body)
    tokens = await spent(urls[0], KEYS["admin"], "small", first[200])
    second = await burst(urls, KEYS["small"], n, body)
    return {
        "budget_tokens": budget,
        "burst": n,
        "admitted": first[200],
        "refused": first[429],
        "spent_tokens": tokens,
        "overshoot_tokens": max(0, tokens - budget),
        "overshoot_pct": round(max(0, tokens - budget) * 100 / budget, 1),
        "tokens_per_request": round(tokens / first[200], 1) if first[200] else None,
        "second_burst_refused": second[429],
        "statuses": {str(k): v for k, v in sorted((first + second).items())},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        tenants = logs / "tenants.toml"
        tenants.write_text(tenants_toml(args.budget))
        server = await NatsServer(logs / "nats").astart()
        fake_port, ports = free_port(), [free_port() for _ in range(args.edges)]
        settings = Settings(
            nats_url=server.url,
            ollama_url=f"http://127.0.0.1:{fake_port}",
            concurrency=256,
            auth="on",
            tenants_file=str(tenants),
            data_dir=str(logs / "data"),
            log_level="warning",
        )
        interval = args.answer_ms / 1000 / args.tokens
        fake_args = [
            "--port",
            str(fake_port),
            "--tokens",
            str(args.tokens),
            "--token-interval",
            str(interval),
        ]
        fake = Proc("fake", [sys.executable, "-m", "tests.fakes.ollama", *fake_args], logs, cwd=REPO)
        env = settings.to_env()
        procs = [fake]
        for name in ("generator", "ledger"):
            procs.append(Proc(name, [sys.executable, "-m", "services.cli", name], logs, env=env, cwd=REPO))
        edges = [
            Proc(
                f"edge{i}",
                [sys.executable, "-m", "services.cli", "edge"],
                logs,
                env={**env, "LLMBUS_HTTP_PORT": str(port)},
                cwd=REPO,
            )
            for i, port in enumerate(ports)
        ]
        procs += edges
        try:
            for proc in procs:
                proc.start()
            fake.wait_port(fake_port)
            for proc, port in zip(edges, ports, strict=True):
                proc.wait_port(port)
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            await _ready(urls)
            body = {**BODY, "options": {"num_predict": args.num_predict}} if args.num_predict else BODY
            result = await measure(urls, args.budget, args.burst, body)
        finally:
            for proc in reversed(procs):
                proc.stop()
            await server.astop()
    return {
        "edges": args.edges,
        "answer_ms": args.answer_ms,
        "tokens_per_answer": args.tokens,
        "num_predict": args.num_predict or f"none (capped at {settings.max_output_tokens})",
        **result,
    }


async def _ready(urls: list[str]) -> None:
    """Every edge attached to NATS and a ledger answering (`/v1/usage` is 200, not 503)."""
    auth = {"Authorization": f"Bearer {KEYS['admin']}"}
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=5) as http:
        for url in urls:
            while (await http.get(f"{url}/v1/usage", headers=auth)).status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{url} or the ledger did not become ready")
                await asyncio.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--burst", type=int, default=64, help="requests fired at once")
    parser.add_argument("--budget", type=int, default=200, help="the tenant's tokens_per_day")
    parser.add_argument("--edges", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=8, help="tokens in each answer")
    parser.add_argument("--answer-ms", type=float, default=200.0, help="how long each answer takes")
    parser.add_argument("--num-predict", type=int, default=0, help="the requests' num_predict (0: none)")
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
