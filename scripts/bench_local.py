"""Tokens/s and time to first token through llmbus vs straight to the same llama.cpp server.

    python scripts/bench_local.py [--requests 12] [--tokens 64] [--parallel 4] [--rounds 4] [--json F]

Starts `llmbus local` (llama.cpp from the `local` extra with its default model, SmolLM2-135M-Instruct
from `.llmbus/models`, downloaded there on first use), NATS, the generator
and the edge as separate processes, then sends the same streaming chat request alternately to
llama.cpp's `/v1/chat/completions` and to the edge's `/v1/chat`, one at a time, then `--parallel`
at once, round by round. Greedy sampling with a fixed token count makes every answer the same
length. Times are taken by the client: TTFT from sending to the first text, tokens/s over the
whole answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench.procs import Proc
from services.local import models
from services.runtime.nats_server import NatsServer, free_port

PROMPT = [{"role": "user", "content": "Tell me about the history of the bicycle."}]


@dataclass
class Sample:
    ttft_ms: float
    total_ms: float
    tokens: int


async def direct(http: httpx.AsyncClient, url: str, tokens: int) -> Sample:
    body = {
        "model": models.CHAT_MODEL,
        "messages": PROMPT,
        "stream": True,
        "max_tokens": tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    return await _timed(http, f"{url}/v1/chat/completions", body, b'"content":"')


async def via_llmbus(http: httpx.AsyncClient, url: str, tokens: int) -> Sample:
    body = {
        "model": models.CHAT_MODEL,
        "messages": PROMPT,
        "stream": True,
        "options": {"num_predict": tokens, "temperature": 0},
    }
    return await _timed(http, f"{url}/v1/chat", body, b"event: token")


async def _timed(http: httpx.AsyncClient, url: str, body: dict[str, object], marker: bytes) -> Sample:
    """Counts `marker` occurrences (one per token in both protocols) as bytes arrive."""
    sent = time.perf_counter()
    first: float | None = None
    count = 0
    tail = b""
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for chunk in response.aiter_bytes():
            data = tail + chunk
            found = data.count(marker)
            tail = data[-len(marker) + 1 :]
            if found and first is None:
                first = time.perf_counter()
            count += found
    end = time.perf_counter()
    assert first is not None, "no token arrived"
    return Sample(ttft_ms=(first - sent) * 1000, total_ms=(end - sent) * 1000, tokens=count)


def _summary(samples: list[Sample]) -> dict[str, float]:
    ttft = sorted(s.ttft_ms for s in samples)
    return {
        "requests": len(samples),
        "tokens_per_request": statistics.median(s.tokens for s in samples),
        "ttft_ms_p50": round(statistics.median(ttft), 1),
        "ttft_ms_max": round(ttft[-1], 1),
        "tokens_per_s_p50": round(statistics.median(s.tokens / (s.total_ms / 1000) for s in samples), 1),
    }


async def run(args: argparse.Namespace, chat_url: str, edge_url: str) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(2):  # warm-up: the prompt cache, the connections, the consumer
            await direct(http, chat_url, args.tokens)
            await via_llmbus(http, edge_url, args.tokens)
        one: dict[str, list[Sample]] = {"direct": [], "llmbus": []}
        for _ in range(args.requests):  # alternating, so drift in machine load hits both alike
            one["direct"].append(await direct(http, chat_url, args.tokens))
            one["llmbus"].append(await via_llmbus(http, edge_url, args.tokens))
        rates: dict[str, list[float]] = {"direct": [], "llmbus": []}
        firsts: dict[str, list[float]] = {"direct": [], "llmbus": []}
        for _ in range(args.rounds):  # alternating rounds of `--parallel` streams at once
            for name, call, url in (("direct", direct, chat_url), ("llmbus", via_llmbus, edge_url)):
                started = time.perf_counter()
                batch = await asyncio.gather(*(call(http, url, args.tokens) for _ in range(args.parallel)))
                rates[name].append(sum(s.tokens for s in batch) / (time.perf_counter() - started))
                firsts[name] += [s.ttft_ms for s in batch]
        many = {
            name: {
                "streams": args.parallel,
                "rounds": args.rounds,
                "aggregate_tokens_per_s_p50": round(statistics.median(rates[name]), 1),
                "ttft_ms_p50": round(statistics.median(firsts[name]), 1),
            }
            for name in rates
        }
    return {
        "sequential": {name: _summary(samples) for name, samples in one.items()},
        "parallel": many,
        "raw": {name: [asdict(s) for s in samples] for name, samples in one.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=12, help="sequential requests per path")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--parallel", type=int, default=4, help="streams at once in the parallel rounds")
    parser.add_argument("--rounds", type=int, default=4, help="parallel rounds per path")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not models.installed():
        raise SystemExit("needs the local extra: pip install -e '.[local]'")

    work = Path(tempfile.mkdtemp(prefix="llmbus-bench-local-"))
    chat_port, embed_port, http_port = free_port(), free_port(), free_port()
    nats = NatsServer(work / "nats").start()
    chat_url, edge_url = f"http://127.0.0.1:{chat_port}", f"http://127.0.0.1:{http_port}"
    env = {
        "LLMBUS_NATS_URL": nats.url,
        "LLMBUS_BACKEND": "openai",
        "LLMBUS_BACKEND_URL": chat_url,
        "LLMBUS_LOCAL_CHAT_PORT": str(chat_port),
        "LLMBUS_LOCAL_EMBED_PORT": str(embed_port),
        "LLMBUS_LOCAL_CACHE": str(Path(".llmbus/models").resolve()),
        "LLMBUS_HTTP_PORT": str(http_port),
        "LLMBUS_LOG_LEVEL": "warning",
    }
    cli = [sys.executable, "-m", "services.cli"]
    procs = [Proc(name, [*cli, name], work, env=env) for name in ("local", "generator", "edge")]
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 120
        while True:
            for proc in procs:
                proc.check_alive()
            try:
                ready = httpx.get(f"{edge_url}/health/ready", timeout=1).status_code == 200
                if ready and httpx.get(f"{chat_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the stack did not become ready within 120 s")
            time.sleep(0.2)
        results = asyncio.run(run(args, chat_url, edge_url))
    finally:
        for proc in reversed(procs):
            proc.stop()
        nats.stop()

    print(f"{args.requests} sequential requests per path, {args.tokens} tokens each, greedy")
    print("| path | TTFT p50 (ms) | TTFT max (ms) | tokens/s p50 |")
    print("|---|---|---|---|")
    for name, row in results["sequential"].items():  # type: ignore[attr-defined]
        print(f"| {name} | {row['ttft_ms_p50']} | {row['ttft_ms_max']} | {row['tokens_per_s_p50']} |")
    print(f"\n{args.parallel} streams at once, {args.rounds} rounds per path")
    print("| path | aggregate tokens/s p50 | TTFT p50 (ms) |")
    print("|---|---|---|")
    for name, row in results["parallel"].items():  # type: ignore[attr-defined]
        print(f"| {name} | {row['aggregate_tokens_per_s_p50']} | {row['ttft_ms_p50']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
