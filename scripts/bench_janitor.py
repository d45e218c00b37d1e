"""What the model janitor adds: the edge's model check, the usage event, inventory propagation.

    python scripts/bench_janitor.py [--models 100] [--hosts 3] [--rounds 200]

1. The edge's check on every request (`InventoryView.require`: dict lookups, no I/O).
2. Building and encoding the usage event every worker publishes after a request.
3. How long a janitor's KV write takes to reach a watching edge (real nats-server).
4. One admin round trip over NATS (`list`, which also reads the fake Ollama's tags and ps).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts import subjects
from contracts.models import ModelInfo, ModelList, UsageEvent
from services.janitor.main import JanitorService
from services.runtime.admin_client import AdminClient
from services.runtime.inventory import InventoryView, encode_info, open_bucket
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings
from tests.fakes.ollama import FakeConfig, FakeOllama


def per_call_us(call: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e6


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(models: int, hosts: int, rounds: int) -> None:
    # 1. the check, against a populated view (filled directly: no bus needed)
    view = InventoryView()
    for h in range(hosts):
        for m in range(models):
            info = ModelInfo(host=f"gpu{h}", model=f"model{m}:7b", state="available")
            view.entries[subjects.inventory_key(info.host, info.model)] = info
            view._by_model.setdefault(info.model, {})[info.host] = info
    view.synced.set()
    hit = per_call_us(lambda: view.require("model42:7b"), 200_000)
    alias = per_call_us(lambda: view.require("Model42:7B"), 200_000)
    print(f"edge check, {hosts} hosts x {models} models: {hit:.2f} µs per request", end="")
    print(f" ({alias:.2f} µs for a respelled name)")

    # 2. the usage event
    encode = msgspec.json.Encoder().encode

    def usage() -> bytes:
        return encode(
            UsageEvent(
                model="llama3.2:1b",
                kind="generate",
                request_id="0123456789abcdef",
                at=time.time(),
                outcome="done",
                duration_ms=12.5,
                prompt_tokens=31,
                completion_tokens=40,
            )
        )

    print(f"usage event: {per_call_us(usage, 200_000):.2f} µs to build and encode, {len(usage())} bytes")

    # 3 and 4: a real server
    with tempfile.TemporaryDirectory() as tmp:
        server = await NatsServer(Path(tmp) / "nats").astart()
        try:
            nc = await nats.connect(server.url)
            kv = await open_bucket(nc.jetstream())
            watched = await InventoryView().start(nc.jetstream())
            await watched.synced.wait()
            lags: list[float] = []
            for i in range(rounds):
                info = ModelInfo(host="gpu0", model="probe:1b", state="available", updated_at=float(i))
                key = subjects.inventory_key(info.host, info.model)
                start = time.perf_counter()
                await kv.put(key, encode_info(info))
                # Spin on the loop: the view has no change event, and a sleep would add its own delay.
                while (got := watched.entries.get(key)) is None or got.updated_at != float(i):  # noqa: ASYNC110
                    await asyncio.sleep(0)
                lags.append((time.perf_counter() - start) * 1000)
            print(
                f"inventory write -> edge view: p50 {statistics.median(lags):.2f} ms, "
                f"p99 {pct(lags, 0.99):.2f} ms ({rounds} writes)"
            )
            await watched.stop()

            async with FakeOllama(FakeConfig()) as fake:
                models_file = Path(tmp) / "models.toml"
                models_file.write_text("")
                settings = Settings(nats_url=server.url, ollama_url=fake.url, models_file=str(models_file))
                janitor = JanitorService(settings)
                await janitor.start()
                admin = AdminClient(nc)
                times: list[float] = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    await admin.call("list", None, ModelList)
                    times.append((time.perf_counter() - start) * 1000)
                print(
                    "admin list over NATS (reads Ollama's tags and ps): "
                    f"p50 {statistics.median(times):.2f} ms, p99 {pct(times, 0.99):.2f} ms ({rounds} calls)"
                )
                await janitor.stop()
            await nc.close()
        finally:
            await server.astop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.models, args.hosts, args.rounds))
