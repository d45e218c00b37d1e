"""`llmbus ledger`: every request's record in a database, its read API, and tenants' running totals.

It consumes the usage events workers publish after each request (kept in `LLM_USAGE`), writes one
row per request (services/ledger/store.py), answers `llm.ledger.*` (services/ledger/api.py), and
after each batch puts the touched tenants' day and month totals in KV `llm_spend`, which every edge
watches to enforce budgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from contracts import subjects
from contracts.ledger import Spend
from services.ledger import api, consumer
from services.ledger.costs import Costs
from services.ledger.store import Store, database_url, display
from services.runtime import bus, service
from services.runtime.retry import Backoff
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.ledger")

_encode = msgspec.json.Encoder().encode
OPEN_RETRY = Backoff(base_s=0.5, max_s=5.0)


def purge_interval(retention_s: float) -> float:
    """A tenth of the retention, between 1 s and an hour: content outlives it by at most that."""
    return min(3600.0, max(1.0, retention_s / 10))


def spend_bucket() -> KeyValueConfig:
    return KeyValueConfig(bucket=subjects.SPEND_BUCKET, history=1, storage=StorageType.FILE)


class LedgerService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = database_url(settings.database_url, settings.data_dir)
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self.store: Store | None = None

    async def start(self) -> None:
        settings = self.settings
        self._started = True
        self.nc = await bus.connect_with_retry(settings, "llmbus-ledger")
        js = self.nc.jetstream()
        await consumer.provision(js, settings)  # from now on usage events are kept, ledger up or not
        self.spend: KeyValue = await bus.key_value(js, spend_bucket())
        self.store = await self._open()
        log.info("ledger writing to %s", display(self.url))
        self.consumer = consumer.Consumer(
            js,
            self.store,
            Costs(settings.models_file),
            settings.ledger_batch,
            self._publish,
            keep_content=settings.ledger_content == "on",
        )
        self._micro = await api.serve(
            self.nc, self.store.engine, self.store.dialect, lambda: consumer.lag_stats(self.consumer)
        )
        await self.nc.flush()
        await self._publish(await self.store.spend_of(await self.store.tenants()))  # a fresh bucket
        self._tasks = [asyncio.create_task(self.consumer.run()), asyncio.create_task(self._purge())]

    async def _open(self) -> Store:
        """The database, waited for (a PostgreSQL container starting alongside) with logged backoff."""
        attempt = 0
        while True:
            try:
                return await Store.open(self.url)
            except Exception as exc:
                delay = OPEN_RETRY.delay(min(attempt, 8))
                attempt += 1
                log.warning("database %s unavailable (%s); retrying in %.1f s", display(self.url), exc, delay)
                await asyncio.sleep(delay)

    async def _purge(self) -> None:
        """Deletes prompts and answers older than the retention, at start and then periodically
        (also with content off: what was kept while it was on still expires)."""
        retention = self.settings.ledger_content_retention_s
        every = purge_interval(retention)
        assert self.store is not None
        while True:
            try:
                if purged := await self.store.purge(time.time() - retention):
                    log.info("purged %d prompts and answers older than %g s", purged, retention)
            except Exception as exc:  # the database is down: the next round tries again
                log.warning("could not purge old prompts and answers: %s", exc)
            await asyncio.sleep(every)

    async def _publish(self, spent: list[Spend]) -> None:
        for totals in spent:
            try:
                await self.spend.put(totals.tenant, _encode(totals))
            except Exception as exc:  # the next batch of that tenant puts it again
                log.warning("could not publish the totals of tenant %r: %s", totals.tenant, exc)

    async def stop(self, grace: float | None = None) -> None:
        if not self._started:
            return
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._micro.stop()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self.nc.drain()
        if self.store is not None:
            await self.store.close()


def main(settings: Settings) -> None:
    service.run(LedgerService(settings), "ledger", settings)
