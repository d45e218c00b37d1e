"""`llmbus batcher`: runs the batches of OpenAI's Batch API (docs/batches.md).

A service of its own, not a loop in the edge or a generator: a batch outlives any HTTP request,
and runs for hours while edges and generators scale and restart; the generators stay plain workers
of `LLM_REQ`. Batches wait in the work queue `LLM_BATCH`; a batcher takes one, keeps it with
in-progress acks while it runs, and acks it when the output files are written. One that dies
leaves its batch to be redelivered (after `ack_wait`) to another batcher, or itself restarted,
which resumes it from the lines kept in KV. Replicas share the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig

from contracts.batches import BATCH_STREAM, BATCH_SUBJECT
from services.batcher.runner import BatchRun
from services.edge.admission import Admission
from services.edge.dispatch import Dispatcher
from services.edge.tenants import ANONYMOUS, Tenant, TenantsFile
from services.runtime import bus, service
from services.runtime.batch_store import BatchStore
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.batcher")

DURABLE = "batcher"
SWEEP_S = 60.0  # how often expired files are deleted (a lookup refuses one at once anyway)
ACK_WAIT_S = 30.0  # a batcher that died gives up its batch after this (it heartbeats far more often)


class BatcherService:
    def __init__(self, settings: Settings, *, ack_wait_s: float = ACK_WAIT_S) -> None:
        self.settings = settings
        self.ack_wait_s = ack_wait_s
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # A batch's lines run as its owner; with auth off everyone is the anonymous tenant.
        self.tenants = TenantsFile(settings.tenants_file) if settings.auth == "on" else None
        self.nc: Client | None = None
        self.admission: Admission | None = None

    async def start(self) -> None:
        settings = self.settings
        self.nc = nc = await bus.connect_with_retry(settings, "llmbus-batcher")
        js = nc.jetstream()
        await bus.provision(js, settings)
        self.store = await BatchStore.open(js, settings)
        # The owner's limits as the edge applies them (models, budget, requests per minute,
        # in flight): a line is an ordinary request of the tenant's.
        self.admission = await Admission(settings, js).start()
        self.dispatcher = Dispatcher(
            nc,
            max_timeout_s=settings.request_timeout_s,
            admission=self.admission,
            # After a reconnect (maybe a restarted NATS without LLM_OUT), as the edge does.
            provision=lambda: bus.provision(js, settings),
        )
        await js.add_consumer(
            BATCH_STREAM,
            ConsumerConfig(
                durable_name=DURABLE,
                filter_subject=BATCH_SUBJECT,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait_s,
                max_ack_pending=-1,
            ),
        )
        self.pull = await js.pull_subscribe_bind(DURABLE, BATCH_STREAM)
        self._task = asyncio.create_task(self._loop())
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Files past their `expires_at` go (their bytes too); every replica may, deleting is idempotent."""
        while True:
            try:
                if swept := await self.store.sweep_files():
                    log.info("deleted %d expired files", swept)
            except Exception as exc:  # NATS away for a moment: next time
                log.warning("expired files: %r", exc)
            await asyncio.sleep(SWEEP_S)

    async def _loop(self) -> None:
        while True:
            try:
                msgs = await self.pull.fetch(1, timeout=5)
            except (NatsTimeoutError, TimeoutError):
                continue
            except Exception as exc:  # NATS away for a moment: the queue is still there
                log.warning("batch queue: %s", exc)
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                batch_id = msg.data.decode()
                try:
                    run = BatchRun(self.store, self.dispatcher, self.settings, batch_id, self.owner)
                    await run.run(msg.in_progress)
                except asyncio.CancelledError:
                    raise  # stopping: the batch stays unacked and resumes on the next batcher
                except Exception:
                    log.exception("batch %s: could not run; it is retried", batch_id)
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=5)
                    continue
                with contextlib.suppress(Exception):
                    await msg.ack()

    def owner(self, name: str) -> Tenant:
        """The tenant a batch belongs to, as the tenants file says now (one removed since keeps its name)."""
        if self.tenants is None:
            return ANONYMOUS
        return self.tenants.current().tenants.get(name) or Tenant(name=name)

    async def stop(self, grace: float | None = None) -> None:
        for task in (self._task, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.admission is not None:
            with contextlib.suppress(Exception):
                await self.admission.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.nc.close()


def main(settings: Settings) -> None:
    service.run(BatcherService(settings), "batcher", settings)
