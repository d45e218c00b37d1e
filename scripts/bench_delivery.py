"""What storing terminal events with JetStream's acknowledgement costs (docs/reliability.md).

    python scripts/bench_delivery.py [--samples 2000]

Starts its own nats-server, provisions the streams, then times, in turns, a core publish followed
by a flush (one round trip, what an unacknowledged event costs at most) and `store_event` (what a
worker does for every `done`/`error` before it acks the request).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.runtime import bus
from services.runtime.event_store import store_event
from services.runtime.nats_server import NatsServer
from services.runtime.settings import Settings

EVENT = b'{"type":"done","finish_reason":"stop","seq":41,"attempt":1}'


def quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[int(len(ordered) * 0.99)]
    return f"p50 {statistics.median(ordered) * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs"


async def run(samples: int) -> None:
    with tempfile.TemporaryDirectory() as data:
        server = await NatsServer(Path(data)).astart()
        try:
            nc = await nats.connect(server.url)
            await bus.provision(nc.jetstream(), Settings(nats_url=server.url))
            core: list[float] = []
            stored: list[float] = []
            for i in range(samples):
                subject = f"llm.out.bench{i % 64:08d}"
                started = time.perf_counter()
                await nc.publish(subject, EVENT)
                await nc.flush()
                core.append(time.perf_counter() - started)
                started = time.perf_counter()
                await store_event(nc, subject, EVENT, f"bench.{i}")
                stored.append(time.perf_counter() - started)
            print(f"core publish + flush:          {quantiles(core)}")
            print(f"store_event (JetStream ack):   {quantiles(stored)}")
            await nc.close()
        finally:
            await server.astop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000)
    asyncio.run(run(parser.parse_args().samples))


if __name__ == "__main__":
    main()
