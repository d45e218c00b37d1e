"""Response cache: a cache hit's latency beside a live answer's, side by side.

    python scripts/bench_cache.py                          # 20 questions, a model-like fake
    python scripts/bench_cache.py --requests 5 --first-token-ms 0 --token-ms 0   # overhead only

It runs nats-server, the fake Ollama (its first token after `--first-token-ms`, then one token
every `--token-ms`), a generator and the edge with `LLMBUS_RESPONSE_CACHE=exact`, all in this
process, then streams `--requests` distinct `temperature: 0` chat questions one at a time (each a
miss: the model answers), and the same questions again (each a hit: replayed from the KV bucket).
TTFT is from sending the request to the first `token` event; total is to the end of the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.edge.app import create_app  # noqa: E402
from services.edge.http_protocol import edge_protocol  # noqa: E402
from services.generator.main import Generator  # noqa: E402
from services.runtime.nats_server import NatsServer, free_port  # noqa: E402
from services.runtime.settings import Settings  # noqa: E402
from tests.fakes.ollama import FakeConfig, FakeOllama  # noqa: E402

MODEL = "llama3.2:1b"


async def ask(http: httpx.AsyncClient, question: str) -> tuple[float, float, str]:
    """(TTFT s, total s, the `Llmbus-Cache` header) of one streamed chat."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "options": {"temperature": 0},
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    async with http.stream("POST", "/v1/chat", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line == "event: token":
                first = time.perf_counter()
    total = time.perf_counter() - started
    return (first or time.perf_counter()) - started, total, response.headers.get("llmbus-cache", "")


def row(kind: str, samples: list[tuple[float, float, str]]) -> str:
    ttft = sorted(s[0] * 1000 for s in samples)
    total = sorted(s[1] * 1000 for s in samples)

    def p95(values: list[float]) -> float:
        return values[min(len(values) - 1, int(0.95 * len(values)))]

    return (
        f"| {kind} | {len(samples)} | {statistics.median(ttft):.2f} | {p95(ttft):.2f} "
        f"| {statistics.median(total):.2f} | {p95(total):.2f} |"
    )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = await NatsServer(Path(tmp) / "nats", auth=True, anonymous="admin").astart()
        delay, interval = args.first_token_ms / 1000, args.token_ms / 1000
        config = FakeConfig(first_token_delay=delay, token_interval=interval, tokens=args.tokens)
        try:
            async with FakeOllama(config) as fake:
                settings = Settings(
                    nats_url=server.url,
                    nats_credentials=str(server.credentials_file),
                    ollama_url=fake.url,
                    http_port=free_port(),
                    data_dir=str(Path(tmp) / "data"),
                    response_cache="exact",
                    log_level="warning",
                )
                generator = Generator(settings)
                await generator.start()
                attached = asyncio.Event()
                app = create_app(settings, on_ready=attached.set)
                uv = uvicorn.Server(
                    uvicorn.Config(
                        app,
                        port=settings.http_port,
                        log_level="warning",
                        http=edge_protocol(settings.http_header_timeout_s, settings.http_body_timeout_s),
                    )
                )
                serving = asyncio.create_task(uv.serve())
                await asyncio.wait_for(attached.wait(), 30)  # the edge is attached to NATS
                try:
                    url = f"http://127.0.0.1:{settings.http_port}"
                    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                        questions = [f"What is {n} times {n + 1}?" for n in range(args.requests)]
                        await ask(http, "warm-up question")
                        misses = [await ask(http, q) for q in questions]
                        await asyncio.sleep(0.5)  # a miss's answer is stored just after it ends
                        hits = [await ask(http, q) for q in questions]
                    assert all(m[2] == "miss" for m in misses), "every first ask must be a miss"
                    assert all(h[2] == "hit" for h in hits), "every second ask must be a hit"
                finally:
                    uv.should_exit = True
                    await serving
                    await generator.stop(grace=0)
        finally:
            await server.astop()
    print(
        f"fake model: first token after {args.first_token_ms} ms, then {args.tokens} tokens "
        f"{args.token_ms} ms apart; one request at a time"
    )
    print("| answer | requests | TTFT p50 ms | TTFT p95 ms | total p50 ms | total p95 ms |")
    print("|---|---|---|---|---|---|")
    print(row("live (miss)", misses))
    print(row("cache hit", hits))


if __name__ == "__main__":
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--first-token-ms", type=float, default=150.0)
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=32)
    asyncio.run(main(parser.parse_args()))
