"""Process lifecycle shared by every service: logging, tracing, signals, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
from typing import Protocol

from services.runtime import logs, tracing
from services.runtime.settings import Settings, unknown_variables

log = logging.getLogger(__name__)


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...


def setup_process(name: str, settings: Settings) -> None:
    """What every service does first: log lines (`services.runtime.logs`), a warning for each
    `LLMBUS_*` variable no setting reads, tracing."""
    logs.setup(settings.log_level, f"llmbus-{name}", settings.log_format)
    for warning in unknown_variables():
        log.warning(warning)
    tracing.setup(f"llmbus-{name}")


# Allocations (net of frees) between two collections of the youngest generation, once serving.
YOUNG_GC_THRESHOLD = 20_000


def freeze_startup_heap() -> None:
    """Takes what startup left alive (modules, the app, clients: ~70k objects) out of the cyclic
    collector's walks, once the process is ready to serve. A full collection then visits only what
    requests allocate; walking the startup heap too paused the event loop for 70-110 ms, which was
    the p99 of every stream's token gaps under load (docs/benchmarks.md). The cost: startup state
    that is later dropped inside a reference cycle is never reclaimed, once, not per request.

    The youngest generation is then collected every `YOUNG_GC_THRESHOLD` allocations instead of
    CPython's 700: a streamed request allocates thousands of short-lived objects, almost none in
    cycles; the default's collections cost the edge 2-3 % of its CPU (docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


def run(service: Service, name: str, settings: Settings) -> None:
    """Runs `service` until SIGINT or SIGTERM, then stops it gracefully."""
    setup_process(name, settings)
    try:
        import uvloop

        uvloop.run(_serve(service, settings.shutdown_grace_s))
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard] on Linux
        asyncio.run(_serve(service, settings.shutdown_grace_s))
    tracing.shutdown()


# After a graceful stop, what is left (tasks of libraries cancelled by asyncio.run, tracing's last
# export) gets this long before the process exits anyway: with NATS gone too (the supervisor died),
# a client's task that ignores cancellation would otherwise hold the process forever.
EXIT_WATCHDOG_S = 3.0


def _exit_unless_done(after: float) -> None:
    def exit_now() -> None:
        log.warning("still running %.0f s after stopping; exiting", after)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(after, exit_now)
    timer.daemon = True  # a process that exits in time does not wait for it
    timer.start()


async def _serve(service: Service, grace: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A signal while starting (NATS down: `bus.connect_with_retry` waits) stops the process at once.
    starting = asyncio.create_task(service.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("stopped before it was ready")
        _exit_unless_done(EXIT_WATCHDOG_S)
        return
    stopping.cancel()
    starting.result()  # a failed start ends the process with its error
    freeze_startup_heap()
    await stop.wait()
    try:
        # `stop` gives in-flight work `grace`; a stop stuck on a vanished NATS gets a little more.
        await asyncio.wait_for(service.stop(), grace + 5)
    except TimeoutError:
        log.warning("the graceful stop took longer than %.0f s; exiting", grace + 5)
    _exit_unless_done(EXIT_WATCHDOG_S)
