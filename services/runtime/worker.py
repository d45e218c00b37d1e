"""The one consumer loop every worker service runs.

A `Worker` pulls requests from a durable JetStream consumer with bounded concurrency and hands
each to a handler as a `Job` (services/runtime/worker_job.py). Each delivery passes the same
stages, each in its own module:

1. decode and validate, or reject to `LLM_DLQ` (`worker_intake`);
2. take-over of a redelivery: still running here, ended already, continued after its events, or
   dead-lettered after `max_deliver` (`worker_takeover`);
3. the request's scope: log context and a consumer span (`worker_scope`);
4. deadline and cancel: never started when cancelled or expired, stopped at its deadline
   (`worker_deadline`);
5. the terminal guarantee: exactly one terminal event, whatever the handler does (`worker_terminal`);
6. ack once it ended (the terminal event is stored first), nak otherwise (`worker_ack`).

The loop itself owns what spans requests: the pull slots, in-progress acks while long generations
run, cancels, re-creating what a restarted server lost after NATS reconnects (`bus.reconnects`) and
republishing the events that did not reach `LLM_OUT`, and the graceful drain: on stop, no new
pulls, in-flight jobs get a grace period, the rest are nak'ed so another replica takes them.

It also owns the batch lane (`llm.req.batch.<kind>.<model>`, a durable of its own): at most
`LLMBUS_BATCH_SLOTS` batch lines at once, each started only while the worker has a slot free of
interactive work. A free slot is always pulling interactive requests, so a free slot here means no
interactive request for these models is waiting anywhere: batch work fills idle capacity only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic

import nats.micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from contracts import headers, subjects
from services.runtime import bus, metrics, usage
from services.runtime.retry import Backoff, with_backoff
from services.runtime.settings import Settings
from services.runtime.worker_ack import redeliver_soon, settle
from services.runtime.worker_deadline import Running, deadline_of, refuse_unstartable
from services.runtime.worker_intake import Intake
from services.runtime.worker_job import Handler, Job, R
from services.runtime.worker_scope import request_scope
from services.runtime.worker_takeover import exhausted, still_running, take_over
from services.runtime.worker_terminal import run_to_end

log = logging.getLogger(__name__)

# Free slots with a pull request outstanding at once. Each re-issues its pull every 5 s, so one
# per slot made an idle worker sized for 256 requests cost NATS and itself ~7 % of a core; the
# other free slots wait their turn (a pull is one round trip, so a burst still ramps up in ms).
FETCHERS = 16


class Worker(Generic[R]):
    def __init__(
        self,
        nc: Client,
        settings: Settings,
        *,
        service: str,
        filter_subject: str | list[str],
        request_type: type[R],
        handler: Handler[R],
        concurrency: int | None = None,
        durable: str | None = None,
        job_factory: Callable[..., Job[R]] | None = None,
        batch_filter_subject: str | list[str] | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self.service = service
        self.durable = durable or service  # replicas with the same filter share one consumer
        self.filter_subject = filter_subject
        self.handler = handler
        self._job = job_factory or Job  # a RecordingJob keeps the answer (services/runtime/transcript.py)
        self.concurrency = concurrency or settings.concurrency
        self.batch_filter_subject = batch_filter_subject
        self.batch_durable = f"{self.durable}-batch"
        self.batch_slots = settings.batch_slots if batch_filter_subject else 0
        self._freed = asyncio.Condition()  # a job ended: a batch slot may start the next line
        # Until then (event-loop time) a first delivery may be a repeat: a NATS killed before it
        # wrote its consumers' state hands out again, as first deliveries, what it had delivered.
        self._repeats_until = 0.0
        self._intake = Intake(nc, service, request_type)
        self._running: Running[R] = Running()
        self._tasks: list[asyncio.Task[None]] = []
        self._resends: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()
        self._fetchers = asyncio.Semaphore(FETCHERS)
        url = settings.embed_url if service == "embedder" else settings.generate_url
        self.host = usage.host_of(url)
        self._stopping = False
        self._unsubscribe_reconnects: Callable[[], None] | None = None
        self._micro: nats.micro.service.Service | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def _provision(self) -> None:
        await bus.provision(self.js, self.settings)
        await bus.ensure_consumer(self.js, self.settings, self.durable, self.filter_subject)
        if self.batch_slots and self.batch_filter_subject:
            await bus.ensure_consumer(self.js, self.settings, self.batch_durable, self.batch_filter_subject)

    async def start(self) -> None:
        await self._provision()
        self._psub = await self.js.pull_subscribe_bind(self.durable, subjects.REQUEST_STREAM)
        self._cancel_sub = await self.nc.subscribe(subjects.CANCEL_SUBJECTS, cb=self._on_cancel)
        # A new leader of LLM_OUT may lack the newest events the old one had not replicated yet.
        self._leader_sub = await self.nc.subscribe(
            subjects.LEADER_ELECTED_ADVISORY.format(stream=subjects.EVENT_STREAM), cb=self._on_new_leader
        )
        # Discovery and liveness for free: `$SRV.PING|INFO|STATS.llmbus-<service>`.
        self._micro = await nats.micro.add_service(
            self.nc,
            name=f"llmbus-{self.service}",
            version="0.1.0",
            description=f"llmbus {self.service} worker",
            metadata={
                "filter": ",".join(bus.filters(self.filter_subject)),
                "durable": self.durable,  # /v1/queue: which consumer's queue it serves ...
                "concurrency": str(self.concurrency),  # ... with how many slots
            },
        )
        self._tasks = [asyncio.create_task(self._slot()) for _ in range(self.concurrency)]
        if self.batch_slots:
            self._batch_psub = await self.js.pull_subscribe_bind(self.batch_durable, subjects.REQUEST_STREAM)
            self._tasks += [asyncio.create_task(self._batch_slot()) for _ in range(self.batch_slots)]
        self._keeper = asyncio.create_task(self._keep_alive())
        self._tasks.append(self._keeper)
        self._unsubscribe_reconnects = bus.reconnects(self.nc).subscribe(self._after_reconnect)
        metrics.watch_worker(self, self.settings.http_host, self.settings.metrics_port, self.settings.replica)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop pulling, let in-flight jobs finish within `grace`, nak the rest."""
        self._stopping = True
        for task in list(self._idle):
            task.cancel()
        grace = self.settings.shutdown_grace_s if grace is None else grace
        jobs = [job.task for job in self._running if job.task is not None]
        if jobs:
            await asyncio.wait(jobs, timeout=grace)
        # No interest first: the server then drops this process's pending pull requests, so what
        # is nak'ed next goes straight to another replica instead of back here.
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
        if self.batch_slots:
            with contextlib.suppress(Exception):
                await self._batch_psub.unsubscribe()
        for job in self._running:
            job.cancel("shutdown")
        self._keeper.cancel()  # it may be asleep for ack_wait/3: do not wait for it
        if self._unsubscribe_reconnects is not None:
            self._unsubscribe_reconnects()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._cancel_sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._leader_sub.unsubscribe()
        if self._micro is not None:
            with contextlib.suppress(Exception):
                await self._micro.stop()
        metrics.unwatch_worker(self)

    async def _on_cancel(self, msg: Msg) -> None:
        self._running.cancel(msg.subject[len(subjects.CANCEL_PREFIX) :])

    async def _after_reconnect(self) -> None:
        """NATS is back, maybe a restarted server that lost `LLM_OUT` (a memory stream) or more:
        re-create what this worker needs, then every running job republishes the events that did
        not make it into the stream (all of them, into a re-created one)."""
        if self._stopping:
            return
        self._repeats_until = asyncio.get_running_loop().time() + max(30.0, 3 * self.settings.ack_wait_s)
        try:
            await self._provision()
        finally:
            self._resend_all()

    async def _on_new_leader(self, msg: Msg) -> None:
        self._resend_all()

    def _resend_all(self) -> None:
        for job in self._running:
            task = asyncio.create_task(self._resend(job))
            self._resends.add(task)
            task.add_done_callback(self._resends.discard)

    async def _resend(self, job: Job[R]) -> None:
        async def attempt() -> int:
            return await job.resend_lost()

        try:  # the stream may still be electing a leader: a few bounded tries
            count = await with_backoff(
                attempt,
                backoff=Backoff(retries=6, base_s=0.25, max_s=2.0),
                retryable=lambda exc: isinstance(exc, NatsTimeoutError | TimeoutError),
            )
        except Exception as exc:
            log.warning("request %s: could not check its events after a reconnect: %r", job.id, exc)
            return
        if count:
            log.info("request %s: republished %d events lost with the old connection", job.id, count)

    async def _keep_alive(self) -> None:
        """In-progress acks, so a generation longer than `ack_wait` is not redelivered."""
        interval = max(self.settings.ack_wait_s / 3, 0.2)
        while not self._stopping:
            await asyncio.sleep(interval)
            for job in self._running:
                with contextlib.suppress(Exception):
                    await job.msg.in_progress()

    async def _slot(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping:
            self._idle.add(me)  # also while it waits for a fetcher: `stop` ends that wait
            try:
                async with self._fetchers:
                    msgs = await self._pull(self._psub, 5)
            except asyncio.CancelledError:
                return
            finally:
                self._idle.discard(me)
            if msgs is None:
                return
            await self._handle(msgs)

    async def _batch_slot(self) -> None:
        """A batch-lane slot: waits until interactive work leaves a slot free, then takes one line
        (a short pull, so a line is not taken long after the slot it was meant for filled)."""
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping:
            self._idle.add(me)  # so `stop` ends the wait
            try:
                async with self._freed:
                    await self._freed.wait_for(lambda: self.in_flight < self.concurrency)
            except asyncio.CancelledError:
                return
            finally:
                self._idle.discard(me)
            msgs = await self._pull(self._batch_psub, 1)
            if msgs is None:
                return
            await self._handle(msgs)

    async def _pull(self, psub: JetStreamContext.PullSubscription, wait_s: float) -> list[Msg] | None:
        """One message or none; None once `stop` cancelled the wait."""
        me = asyncio.current_task()
        assert me is not None
        self._idle.add(me)
        try:
            return await psub.fetch(1, timeout=wait_s)
        except (TimeoutError, NatsTimeoutError):
            return []
        except asyncio.CancelledError:
            return None
        except Exception as exc:  # connection trouble: back off, the client reconnects
            log.warning("fetch failed: %r", exc)
            await asyncio.sleep(0.5)
            return []
        finally:
            self._idle.discard(me)

    async def _handle(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                await self._process(msg)
            except Exception:  # e.g. NATS gone for longer than STORE_PATIENCE_S: redeliver
                await redeliver_soon(msg)
            finally:
                async with self._freed:  # its job ended: a batch slot may take the next line
                    self._freed.notify_all()

    async def _process(self, msg: Msg) -> None:
        """One delivery through the stages, in order (see the module's docstring)."""
        attempt = msg.metadata.num_delivered or 1
        hdrs = msg.headers or {}
        admitted = await self._intake.admit(msg, hdrs, attempt)
        if admitted is None:
            return
        request, reply = admitted
        if await still_running(self._running.get(request.id), msg):
            return
        deadline = deadline_of(hdrs, self.settings.request_timeout_s, asyncio.get_running_loop().time())
        seq = int(hdrs[headers.SEQ]) if hdrs.get(headers.SEQ, "").isdigit() else 0
        job = self._job(self.nc, msg, request, reply=reply, attempt=attempt, deadline=deadline, seq=seq)
        job.host = self.host
        repeat = attempt > 1 or asyncio.get_running_loop().time() < self._repeats_until
        if repeat and not await take_over(self.nc, job):
            return
        if attempt > self.settings.max_deliver:
            await exhausted(self.nc, self.service, job)
            return
        with request_scope(job, hdrs, self.durable) as span:
            if not await refuse_unstartable(job, self._running):
                await run_to_end(
                    job, self.handler, self._running, max_deliver=self.settings.max_deliver, nc=self.nc
                )
            await settle(job, span)
