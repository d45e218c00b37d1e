"""The edge served by granian instead of uvicorn: the benchmark's A/B of the edge's HTTP server.

`python -m scripts.bench --edge granian=scripts.bench.edge_granian` measures it next to the real
edge (`llmbus edge`, uvicorn) in the same run. Granian's embedded mode: one process, no worker
fork, on this process's uvloop, the app's lifespan (NATS connection) as under uvicorn. It streams
SSE token by token and notices hang-ups (tests/test_edge_server.py passed against it), but it
measured no better than uvicorn for this workload (docs/benchmarks.md), so the edge keeps uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import uvloop
from granian.constants import HTTPModes, Interfaces
from granian.log import LogLevels
from granian.server.embed import Server

from services.edge.app import create_app
from services.runtime import tracing
from services.runtime.service import freeze_startup_heap, setup_process
from services.runtime.settings import Settings


async def serve(settings: Settings) -> None:
    app = create_app(settings, on_ready=freeze_startup_heap)  # as `llmbus edge` does
    server = Server(
        app,
        address=settings.http_host,
        port=settings.http_port,
        interface=Interfaces.ASGI,  # with lifespan: the app connects to NATS at start-up
        http=HTTPModes.http1,
        websockets=False,
        log_level=LogLevels.warning,
        log_access=False,  # the edge logs one structured line per request itself
        backlog=2048,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.serve()


def main(settings: Settings) -> None:
    setup_process("edge", settings)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(settings))
    tracing.shutdown()


if __name__ == "__main__":
    main(Settings.from_env())
