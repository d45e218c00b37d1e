"""The backend's HTTP client alone: tokens/s relayed and CPU per request (docs/benchmarks.md).

    python scripts/bench_backend.py [--requests 400] [--tokens 200] [--concurrency 8] [--rounds 3]

Starts the fake Ollama as its own process at zero delay, then streams chats through
`OllamaBackend.generate` in this process, in turns with each client: `lean` (httpx over
`LeanTransport`, what the backends use) and `httpx` (httpx's own transport, the same settings:
HTTP/1.1, the same limits, no read timeout). CPU is this process's, so the fake's is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts import GenerateRequest, Message
from services.runtime.backends import transport
from services.runtime.backends.ollama import OllamaBackend

CLIENTS = ("lean", "httpx")


def backend(url: str, client: str) -> OllamaBackend:
    made = OllamaBackend(url, max_connections=256)
    if client == "httpx":
        made._client = transport.http_client(made.url, max_connections=256, lean=False)
    return made


async def one_round(url: str, client: str, requests: int, concurrency: int) -> tuple[float, float]:
    """(tokens per second, CPU milliseconds per request) of one round."""
    model = backend(url, client)
    queue = list(range(requests))
    pieces = 0

    async def chat(i: int) -> int:
        request = GenerateRequest(
            id=f"bench-{client}-{i:06d}", model="llama3.2:1b", messages=[Message("user", f"q{i}")]
        )
        count = 0
        async for _ in model.generate(request):
            count += 1
        return count

    async def worker() -> None:
        nonlocal pieces
        while queue:
            pieces += await chat(queue.pop())

    for i in range(20):  # warm: connections open, code paths hot
        await chat(i)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await model.aclose()
    return pieces / wall, cpu * 1000 / requests


async def run(args: argparse.Namespace, url: str) -> None:
    results: dict[str, list[tuple[float, float]]] = {client: [] for client in CLIENTS}
    for _ in range(args.rounds):
        for client in CLIENTS:
            results[client].append(await one_round(url, client, args.requests, args.concurrency))
    shape = f"{args.requests} chats x {args.tokens} tokens, {args.concurrency} at once"
    print(f"{shape}, median of {args.rounds} rounds:")
    print(f"{'client':8} {'tokens/s':>10} {'CPU ms/request':>15}")
    for client, rows in results.items():
        speed = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"{client:8} {speed:10.0f} {cpu:15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.ollama", "--port", "0", "--tokens", str(args.tokens)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        url = fake.stdout.readline().rsplit(" ", 1)[-1].strip()  # "fake ollama listening on URL"
        try:
            import uvloop
        except ImportError:
            asyncio.run(run(args, url))
        else:
            uvloop.run(run(args, url))
    finally:
        fake.terminate()
        fake.wait(10)


if __name__ == "__main__":
    main()
