"""Interactive time to first token with and without a large batch running (the batch lane).

    python scripts/bench_batch_lane.py                       # 10,000-line batch, 100 requests each way
    python scripts/bench_batch_lane.py --lines 300 --requests 20   # a quick check
    python scripts/bench_batch_lane.py --batch-slots 4       # let batch lines take more of the slots

It starts nats-server, the fake Ollama (its own process, `--parallel` generations at once, each
`--first-token-ms` before its first token then one token every `--token-ms`), and `llmbus
generator`, `batcher` and `edge` as processes, as `llmbus up` runs them. Then it sends
`--requests` streamed `/v1/chat` requests one after another and times each one's first token
(idle); uploads a `--lines` batch through the OpenAI Files and Batch API, waits until its lines run,
and times the same requests again while it runs; cancels the batch and reports both, their ratio
(the goal: under 1.10 at p50) and the batch's throughput meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.runtime.nats_server import NatsServer, free_port  # noqa: E402

PY = sys.executable
MODEL = "llama3.2:1b"


class Proc:
    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = (log_dir / f"{name}.log").open("wb")
        self.popen = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=log_dir)

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self.log.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def first_token_ms(http: httpx.AsyncClient, i: int) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"interactive {i}"}], "stream": True}
    started = time.perf_counter()
    async with http.stream("POST", "/v1/chat", json=body) as response:
        response.raise_for_status()
        first = None
        async for line in response.aiter_lines():
            if first is None and line.startswith("event: token"):
                first = (time.perf_counter() - started) * 1000
    if first is None:
        raise RuntimeError(f"request {i}: no token")
    return first


async def interactive(http: httpx.AsyncClient, requests: int, gap_s: float) -> list[float]:
    times = []
    for i in range(requests):
        times.append(await first_token_ms(http, i))
        await asyncio.sleep(gap_s)
    return times


async def start_batch(http: httpx.AsyncClient, lines: int) -> str:
    rows = (
        json.dumps(
            {
                "custom_id": f"b{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"batch line {i}"}]},
            }
        )
        for i in range(lines)
    )
    data = ("\n".join(rows) + "\n").encode()
    files = {"file": ("batch.jsonl", data, "application/jsonl")}
    uploaded = (await http.post("/openai/v1/files", data={"purpose": "batch"}, files=files)).json()
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    return str((await http.post("/openai/v1/batches", json=body)).json()["id"])


async def counts(http: httpx.AsyncClient, batch_id: str) -> tuple[str, int]:
    batch = (await http.get(f"/openai/v1/batches/{batch_id}")).json()
    return batch["status"], int(batch["request_counts"]["completed"]) + int(batch["request_counts"]["failed"])


async def wait_ready(http: httpx.AsyncClient, procs: list[Proc]) -> None:
    for _ in range(600):
        for proc in procs:
            if proc.popen.poll() is not None:
                raise SystemExit(f"{proc.name} exited; see {proc.log.name}")
        try:
            if (await http.get("/health/ready")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the edge did not get ready")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--gap-ms", type=float, default=100, help="pause between interactive requests")
    parser.add_argument("--first-token-ms", type=float, default=50)
    parser.add_argument("--token-ms", type=float, default=10)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=4, help="the fake's OLLAMA_NUM_PARALLEL")
    parser.add_argument("--concurrency", type=int, default=4, help="LLMBUS_CONCURRENCY of the generator")
    parser.add_argument("--batch-slots", type=int, default=1, help="LLMBUS_BATCH_SLOTS of the generator")
    parser.add_argument("--batch-concurrency", type=int, default=16, help="LLMBUS_BATCH_CONCURRENCY")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = await NatsServer(work / "nats").astart()
        fake_port, http_port = free_port(), free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LLMBUS_")},
            "PYTHONPATH": str(ROOT),
            "LLMBUS_NATS_URL": server.url,
            "LLMBUS_DATA_DIR": str(work / "data"),
            "LLMBUS_OLLAMA_URL": f"http://127.0.0.1:{fake_port}",
            "LLMBUS_HTTP_PORT": str(http_port),
            "LLMBUS_LOG_LEVEL": "warning",
            "LLMBUS_CONCURRENCY": str(args.concurrency),
            "LLMBUS_BATCH_SLOTS": str(args.batch_slots),
            "LLMBUS_BATCH_CONCURRENCY": str(args.batch_concurrency),
            "LLMBUS_BATCH_MAX_LINES": str(max(args.lines, 1)),
        }
        fake_args = [
            *("--port", str(fake_port), "--tokens", str(args.tokens), "--parallel", str(args.parallel)),
            *(
                "--first-token-delay",
                str(args.first_token_ms / 1000),
                "--token-interval",
                str(args.token_ms / 1000),
            ),
        ]
        procs = [Proc("fake-ollama", [PY, "-m", "tests.fakes.ollama", *fake_args], env, work)]
        for name in ("generator", "batcher", "edge"):
            procs.append(Proc(name, [PY, "-m", "services.cli", name], env, work))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=120) as http:
                await wait_ready(http, procs)
                await interactive(http, 5, 0)  # warm-up: connections, model "loaded"
                idle = await interactive(http, args.requests, args.gap_ms / 1000)
                batch_id = await start_batch(http, args.lines)
                for _ in range(3000):  # its first lines ran: it is under way
                    if (await counts(http, batch_id))[1] >= args.batch_concurrency:
                        break
                    await asyncio.sleep(0.2)
                t0, (_, before) = time.perf_counter(), await counts(http, batch_id)
                busy = await interactive(http, args.requests, args.gap_ms / 1000)
                elapsed, (status, after) = time.perf_counter() - t0, await counts(http, batch_id)
                await http.post(f"/openai/v1/batches/{batch_id}/cancel")
        finally:
            for proc in reversed(procs):
                proc.stop()
            await server.astop()

    print(
        f"fake: {args.parallel} parallel, first token {args.first_token_ms:g} ms, {args.tokens} tokens "
        f"every {args.token_ms:g} ms; generator concurrency {args.concurrency}, batch slots "
        f"{args.batch_slots}; batch {args.lines} lines, {args.batch_concurrency} in flight"
    )
    print(f"{'interactive TTFT (ms)':<28}{'p50':>8}{'p95':>8}{'mean':>8}")
    for name, values in (("idle", idle), ("under the batch", busy)):
        print(f"{name:<28}{pct(values, 0.5):8.1f}{pct(values, 0.95):8.1f}{statistics.mean(values):8.1f}")
    print(f"ratio p50 {pct(busy, 0.5) / pct(idle, 0.5):.3f}, p95 {pct(busy, 0.95) / pct(idle, 0.95):.3f}")
    rate = (after - before) / elapsed
    print(f"batch meanwhile: {after - before} lines in {elapsed:.1f} s ({rate:.1f} lines/s), {status}")


if __name__ == "__main__":
    asyncio.run(main())
