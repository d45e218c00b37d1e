"""`llmbus janitor`: wiring only (one janitor per model host: Ollama or OpenAI-compatible)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from nats.aio.msg import Msg

from contracts import LlmbusError, subjects
from contracts.models import UsageEvent, validate_host
from services.janitor import admin, metrics
from services.janitor.janitor import Janitor
from services.runtime import bus, service
from services.runtime.backends.model_admin import create_model_admin
from services.runtime.inventory import open_bucket
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.janitor")

_decode_usage = msgspec.json.Decoder(UsageEvent).decode
_FIRST_RETRY_S = 0.2


class JanitorService:
    def __init__(self, settings: Settings) -> None:
        try:
            validate_host(settings.janitor_host)
        except LlmbusError as exc:
            raise SystemExit(f"LLMBUS_JANITOR_HOST: {exc.message}") from None
        self.settings = settings
        self.admin = create_model_admin(settings)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    async def start(self) -> None:
        settings = self.settings
        self._started = True
        self.nc = await bus.connect_with_retry(settings, f"llmbus-janitor-{settings.janitor_host}")
        js = self.nc.jetstream()
        kv = await open_bucket(js)  # the inventory: the one thing on the bus the janitor owns

        async def reopen() -> None:  # a NATS that restarted without its store gets it back
            await open_bucket(js)

        bus.reconnects(self.nc).subscribe(reopen)
        self.janitor = Janitor(
            self.nc, kv, self.admin, host=settings.janitor_host, models_file=Path(settings.models_file)
        )
        async with asyncio.timeout(10):
            await self.janitor.restore()
        self.janitor.reload_desired()
        log.info(
            "janitor for host %r: %s at %s, desired state %s",
            settings.janitor_host,
            self.admin.kind,
            self.admin.url,
            settings.models_file,
        )
        self._usage = await self.nc.subscribe(subjects.USAGE_SUBJECTS, cb=self._on_usage)
        self._micro = await admin.serve(self.nc, self.janitor)
        metrics.serve(self.janitor, settings.http_host, settings.metrics_port)
        await self.nc.flush()  # the admin subscriptions are on the server before start returns
        self._tasks = [
            asyncio.create_task(self._first_inventory()),
            asyncio.create_task(self._every(settings.janitor_interval_s, self.janitor.tick)),
            asyncio.create_task(self._reconciling()),
        ]

    async def _first_inventory(self) -> None:
        """Until the model server first answers, every 0.2 s rather than every tick: a server that
        starts alongside (`llmbus up`'s embedded one) is listed at once, and the edge, waiting for
        the inventory (LLMBUS_READY_NEEDS_MODELS), reports ready at once too."""
        while self.janitor.reachable is not True:
            with contextlib.suppress(LlmbusError):
                await self.janitor.sync()
                self.janitor.reconcile_now.set()  # what models.toml wants, now that it can be done
                return
            await asyncio.sleep(_FIRST_RETRY_S)

    async def _on_usage(self, msg: Msg) -> None:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            self.janitor.on_usage(_decode_usage(msg.data))

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await step()
            except Exception:
                log.exception("janitor step failed")
            await asyncio.sleep(interval)

    async def _reconciling(self) -> None:
        """At start, whenever models.toml changes, and every `janitor_reconcile_s`."""
        while True:
            try:
                with metrics.RECONCILE.time():
                    await self.janitor.reconcile()
            except Exception:
                log.exception("reconcile failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.janitor.reconcile_now.wait(), self.settings.janitor_reconcile_s)

    async def stop(self, grace: float | None = None) -> None:
        """Stops at once: a pull in progress is abandoned (Ollama keeps what it downloaded)."""
        if not self._started:
            await self.admin.aclose()
            return
        tasks = self._tasks + [op.task for op in self.janitor.ops.values() if op.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._micro.stop()
        metrics.stop()
        with contextlib.suppress(Exception):
            await self._usage.unsubscribe()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self.nc.drain()
        await self.admin.aclose()


def main(settings: Settings) -> None:
    service.run(JanitorService(settings), "janitor", settings)
