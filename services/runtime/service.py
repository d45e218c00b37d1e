"""Process lifecycle shared by every service: logging, tracing, signals, graceful stop."""

from __future__ import annotations

import asyncio
import signal
from typing import Protocol

from services.runtime import logs, tracing


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...


def setup_logging(level: str, service: str | None = None) -> None:
    """JSON lines with request and trace ids (see `services.runtime.logs`)."""
    logs.setup(level, service)


def run(service: Service, name: str, log_level: str = "info") -> None:
    """Runs `service` until SIGINT or SIGTERM, then stops it gracefully."""
    setup_logging(log_level, f"llmbus-{name}")
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
