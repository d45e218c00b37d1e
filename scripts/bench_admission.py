"""Tenant isolation under overload: tenant A far past its limits, tenant B within them.

A real nats-server, the fake Ollama (each answer takes about `--answer-ms`), one generator and
two edges (each its own process) with LLMBUS_AUTH=on sharing the tenants' limits through NATS KV.
Tenant A (max 4 in flight, `--a-rpm` requests a minute) is driven from another process by
`--a-clients` clients that ignore Retry-After (`--a-pause-ms` after each answer), spread over both
edges; tenant B (max 8 in flight) by `--b-clients` clients, within its limits. B is measured alone
first (baseline), then while A overloads. Prints one JSON object.

    python scripts/bench_admission.py            # docs/benchmarks.md "Admission"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
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

KEYS = {"a": "llmbus_bench_tenant_a", "b": "llmbus_bench_tenant_b"}
BODY = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hello"}]}


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.ok_ms: list[float] = []
        self.refused_ms: list[float] = []


async def client_loop(http: httpx.AsyncClient, key: str, tally: Tally, until: float, pause_s: float) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    while time.monotonic() < until:
        started = time.perf_counter()
        response = await http.post("/v1/chat", json=BODY, headers=headers)
        elapsed = (time.perf_counter() - started) * 1000
        tally.statuses[response.status_code] += 1
        if response.status_code == 200:
            tally.ok_ms.append(elapsed)
        else:
            tally.refused_ms.append(elapsed)
            if response.status_code != 429 or "Retry-After" not in response.headers:
                raise SystemExit(f"unexpected answer {response.status_code}: {response.text}")
        if pause_s:
            await asyncio.sleep(pause_s)


def summary(tally: Tally, seconds: float) -> dict[str, Any]:
    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "statuses": dict(sorted(tally.statuses.items())),
        "ok_per_s": round(len(tally.ok_ms) / seconds, 1),
        "ok_p50_ms": pct(tally.ok_ms, 0.5),
        "ok_p95_ms": pct(tally.ok_ms, 0.95),
        "refused_p50_ms": pct(tally.refused_ms, 0.5),
        "ok_mean_ms": round(statistics.fmean(tally.ok_ms), 1) if tally.ok_ms else None,
    }


async def drive(urls: list[str], key: str, clients: int, seconds: float, pause_s: float) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    https = [httpx.AsyncClient(base_url=url, timeout=30) for url in urls]
    try:
        await asyncio.gather(
            *(client_loop(https[i % len(https)], key, tally, until, pause_s) for i in range(clients))
        )
    finally:
        for http in https:
            await http.aclose()
    return tally


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every part in its own process, so B's latency is the gateway's, not this script's loop."""
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        tenants = logs / "tenants.toml"
        tenants.write_text(
            f'[tenants.a]\nkeys = ["{hash_key(KEYS["a"])}"]\nmax_inflight = 4\n'
            f"requests_per_minute = {args.a_rpm}\n"
            f'[tenants.b]\nkeys = ["{hash_key(KEYS["b"])}"]\nmax_inflight = 8\n'
        )
        server = await NatsServer(logs / "nats").astart()
        fake_port, ports = free_port(), [free_port(), free_port()]
        settings = Settings(
            nats_url=server.url,
            ollama_url=f"http://127.0.0.1:{fake_port}",
            concurrency=64,
            auth="on",
            tenants_file=str(tenants),
            log_level="warning",
        )
        interval = args.answer_ms / 1000 / 8
        fake_args = ["--port", str(fake_port), "--tokens", "8", "--token-interval", str(interval)]
        fake = Proc("fake", [sys.executable, "-m", "tests.fakes.ollama", *fake_args], logs, cwd=REPO)
        procs = [
            fake,
            Proc(
                "generator",
                [sys.executable, "-m", "services.cli", "generator"],
                logs,
                env=settings.to_env(),
                cwd=REPO,
            ),
        ]
        for i, port in enumerate(ports):
            env = {**settings.to_env(), "LLMBUS_HTTP_PORT": str(port)}
            procs.append(
                Proc(f"edge{i}", [sys.executable, "-m", "services.cli", "edge"], logs, env=env, cwd=REPO)
            )
        try:
            for proc in procs:
                proc.start()
            fake.wait_port(fake_port)
            for i, port in enumerate(ports):
                procs[2 + i].wait_port(port)
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            await drive(urls, KEYS["b"], 2, 1.0, 0)  # warm up
            alone = await drive(urls, KEYS["b"], args.b_clients, args.seconds, 0)
            # A's clients in a process of their own, started with B's next round.
            driver = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--drive-a",
                ",".join(urls),
                "--seconds",
                str(args.seconds),
                "--a-clients",
                str(args.a_clients),
                "--a-pause-ms",
                str(args.a_pause_ms),
                stdout=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(0.5)  # A is at full load before B starts
            with_a = await drive(urls, KEYS["b"], args.b_clients, args.seconds - 1, 0)
            out, _ = await driver.communicate()
            a_result = json.loads(out)
        finally:
            for proc in reversed(procs):
                proc.stop()
            await server.astop()
    return {
        "seconds": args.seconds,
        "answer_ms": args.answer_ms,
        "edges": 2,
        "a": {"clients": args.a_clients, "max_inflight": 4, "rpm": args.a_rpm, **a_result},
        "b_alone": {"clients": args.b_clients, "max_inflight": 8, **summary(alone, args.seconds)},
        "b_with_a": {"clients": args.b_clients, "max_inflight": 8, **summary(with_a, args.seconds - 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="each phase")
    parser.add_argument("--answer-ms", type=float, default=100.0, help="how long the fake model takes")
    parser.add_argument("--a-clients", type=int, default=32)
    parser.add_argument("--a-rpm", type=int, default=600)
    parser.add_argument("--a-pause-ms", type=float, default=5.0, help="A's pause after each answer")
    parser.add_argument("--b-clients", type=int, default=4)
    parser.add_argument("--drive-a", metavar="URLS", help=argparse.SUPPRESS)  # the A driver process
    args = parser.parse_args()
    if args.drive_a:
        tally = asyncio.run(
            drive(args.drive_a.split(","), KEYS["a"], args.a_clients, args.seconds, args.a_pause_ms / 1000)
        )
        print(json.dumps(summary(tally, args.seconds)))
        return
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
