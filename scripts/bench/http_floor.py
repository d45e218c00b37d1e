"""What streaming one answer over HTTP costs a Python server alone: the CPU floor under the edge.

The same load as `python -m scripts.bench` (16 tokens, the first after 50 ms, then one every 20 ms;
steady arrivals), against two servers that do nothing else, each a process of its own:

- `raw ASGI on uvicorn`: the fake Ollama the benchmark uses as its upstream (tests/fakes/ollama.py);
- `Litestar Stream on uvicorn`: one Litestar route answering with a `Stream`, as the edge does, with
  nothing of llmbus behind it (no NATS, no middleware, no auth).

The edge cannot spend less than these per request: it does the same HTTP work and reads the tokens
from NATS besides. Printed as CPU milliseconds per request, median of `--runs`.

    python -m scripts.bench.http_floor            # --concurrency 64,256 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import psutil
import uvicorn
from litestar import Litestar, post
from litestar.response import Stream

from scripts.bench.load import NdjsonParser, Target, run_level
from scripts.bench.procs import free_port

REPO = Path(__file__).resolve().parents[2]
TOKENS, FIRST_TOKEN_DELAY, TOKEN_INTERVAL = 16, 0.05, 0.02
BODY = {
    "model": "llama3.2:1b",
    "messages": [{"role": "user", "content": "Why is the sky blue?"}],
    "stream": True,
}
COMMANDS = {
    "raw ASGI on uvicorn": [sys.executable, "-m", "tests.fakes.ollama", "--port"],
    "Litestar Stream on uvicorn": [sys.executable, "-m", "scripts.bench.http_floor", "--serve"],
}


class Chat(msgspec.Struct):
    model: str
    messages: list[dict[str, str]]
    stream: bool = True


TOKEN = b'{"model":"m","message":{"role":"assistant","content":"w "},"done":false}\n'
DONE = b'{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop"}\n'


async def lines() -> AsyncIterator[bytes]:
    await asyncio.sleep(FIRST_TOKEN_DELAY)
    for i in range(TOKENS):
        if i:
            await asyncio.sleep(TOKEN_INTERVAL)
        yield TOKEN
    yield DONE


@post("/api/chat", status_code=200)
async def chat(data: Chat) -> Stream:
    return Stream(lines(), media_type="application/x-ndjson")


def serve(port: int) -> None:
    """`python -m scripts.bench.http_floor --serve PORT`: the bare Litestar route."""
    uvicorn.run(Litestar([chat]), port=port, loop="uvloop", http="httptools", log_level="warning")


async def measure(
    servers: dict[str, tuple[subprocess.Popen[bytes], int]], levels: list[int], runs: int, requests: int
) -> dict[tuple[int, str], list[float]]:
    out: dict[tuple[int, str], list[float]] = {}
    async with httpx.AsyncClient() as http:
        for _, port in servers.values():
            for _ in range(100):  # until it listens
                try:
                    await http.get(f"http://127.0.0.1:{port}/")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        fake_port = servers["raw ASGI on uvicorn"][1]
        config = {
            "tokens": TOKENS,
            "first_token_delay": FIRST_TOKEN_DELAY,
            "token_interval": TOKEN_INTERVAL,
        }
        (await http.post(f"http://127.0.0.1:{fake_port}/_fake/config", json=config)).raise_for_status()
    for concurrency in [c for _ in range(runs) for c in levels]:
        for name, (proc, port) in servers.items():
            target = Target(name, f"http://127.0.0.1:{port}/api/chat", BODY, NdjsonParser)
            server = psutil.Process(proc.pid)
            before = server.cpu_times()
            result = await run_level(
                target,
                concurrency=concurrency,
                requests=max(requests, 4 * concurrency),
                expect_tokens=TOKENS,
                stagger=FIRST_TOKEN_DELAY + (TOKENS - 1) * TOKEN_INTERVAL,
            )
            after = server.cpu_times()
            if result.errors:
                raise SystemExit(f"{name}: {result.errors} errors, {result.error_samples}")
            cpu = after.user + after.system - before.user - before.system
            out.setdefault((concurrency, name), []).append(1000 * cpu / result.requests)
    return out


def main() -> None:
    if "--serve" in sys.argv:
        serve(int(sys.argv[sys.argv.index("--serve") + 1]))
        return
    p = argparse.ArgumentParser(prog="python -m scripts.bench.http_floor", description=__doc__)
    p.add_argument("--concurrency", default="64,256", help="comma-separated concurrent streams")
    p.add_argument("--runs", type=int, default=3, help="each level this many times, servers alternating")
    p.add_argument("--requests", type=int, default=256, help="per level at least this many (and 4 x streams)")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = {
        name: (subprocess.Popen([*cmd, str(port := free_port())], cwd=REPO), port)
        for name, cmd in COMMANDS.items()
    }
    try:
        figures = asyncio.run(measure(servers, levels, args.runs, args.requests))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    print(f"python -m scripts.bench.http_floor --concurrency {args.concurrency} --runs {args.runs}", end="")
    print(f" --requests {args.requests}")
    print("| streams | server | CPU per request ms, median (min..max) |\n|---|---|---|")
    for (streams, name), values in figures.items():
        print(
            f"| {streams} | {name} | {statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f}) |"
        )


if __name__ == "__main__":
    main()
