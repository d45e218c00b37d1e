"""Process lifecycle shared by every service: logging, tracing, signals, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Protocol

from services.runtime import tracing


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per model call is noise


def run(service: Service, name: str, log_level: str = "info") -> None:
    """Runs `service` until SIGINT or SIGTERM, then stops it gracefully."""
    setup_logging(log_level)
    tracing.setup(f"llmbus-{name}")
    try:
        import uvloop

        uvloop.run(_serve(service))
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard] on Linux
        asyncio.run(_serve(service))
    tracing.shutdown()


async def _serve(service: Service) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    await stop.wait()
    await service.stop()
