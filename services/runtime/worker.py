"""The one consumer loop every worker service runs.

A `Worker` pulls requests from a durable JetStream consumer with bounded concurrency and hands
each to a handler as a `Job`. It owns everything that must be done the same way everywhere:

* decode and validate (a malformed message is terminated, never redelivered, and the sender gets an
  `error` event when it named a reply subject);
* exactly one terminal event per request: whatever the handler raises becomes an `error` event
  with a stable code, a handler that returns without one gets `internal`;
* cancellation (`llm.cancel.<id>`, also for requests not started yet), deadlines, in-progress acks
  while a long generation runs, ack after the terminal event;
* graceful drain: on stop, no new pulls, in-flight jobs get a grace period, the rest are nak'ed so
  another replica takes them;
* a consumer span per request, child of the publisher's trace context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import msgspec
import nats.micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from contracts import (
    Done,
    Error,
    ErrorCode,
    Event,
    LlmbusError,
    Start,
    Timings,
    Token,
    Usage,
    headers,
    subjects,
)
from services.runtime import bus, tracing
from services.runtime.settings import Settings

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode


class Request(Protocol):
    id: str

    def validate(self) -> None: ...


R = TypeVar("R", bound=Request)


class Job(Generic[R]):
    """One delivery of one request: the handler's way to publish events."""

    __slots__ = (
        "_nc",
        "attempt",
        "cancel_reason",
        "deadline",
        "msg",
        "reply",
        "request",
        "seq",
        "started",
        "task",
        "terminal",
    )

    def __init__(
        self, nc: Client, msg: Msg, request: R, *, reply: str, attempt: int, deadline: float
    ) -> None:
        self._nc = nc
        self.msg = msg
        self.request = request
        self.reply = reply
        self.attempt = attempt
        self.deadline = deadline  # event-loop time
        self.seq = 0
        self.terminal = False
        self.started = time.perf_counter()
        self.cancel_reason: str | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.request.id

    async def emit(self, event: Event) -> None:
        if self.terminal:
            raise RuntimeError(f"request {self.id} already ended")
        self.terminal = isinstance(event, Done | Error)
        await self._nc.publish(self.reply, _encode(event))
        self.seq += 1

    async def start(self, model: str) -> None:
        await self.emit(Start(seq=self.seq, attempt=self.attempt, request_id=self.id, model=model))

    async def token(self, text: str) -> None:
        # The hot path: one small struct and one encode per token, no headers, no logging.
        await self._nc.publish(self.reply, _encode(Token(seq=self.seq, attempt=self.attempt, text=text)))
        self.seq += 1

    async def done(self, finish_reason: str, usage: Usage, timings: Timings) -> None:
        await self.emit(
            Done(
                seq=self.seq, attempt=self.attempt, finish_reason=finish_reason, usage=usage, timings=timings
            )
        )

    async def fail(self, code: ErrorCode, message: str, retry_after: float | None = None) -> None:
        await self.emit(
            Error(seq=self.seq, attempt=self.attempt, code=code, message=message, retry_after=retry_after)
        )

    def cancel(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            self.cancel_reason = reason
            self.task.cancel()


Handler = Callable[[Job[R]], Awaitable[None]]


class Worker(Generic[R]):
    def __init__(
        self,
        nc: Client,
        settings: Settings,
        *,
        service: str,
        filter_subject: str,
        request_type: type[R],
        handler: Handler[R],
        concurrency: int | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self.service = service
        self.durable = service
        self.filter_subject = filter_subject
        self.handler = handler
        self.concurrency = concurrency or settings.concurrency
        self._decode = msgspec.json.Decoder(request_type).decode
        self._running: dict[str, Job[R]] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # cancels that came before the request
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._micro: nats.micro.service.Service | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        await bus.provision(self.js, self.settings)
        await bus.ensure_consumer(self.js, self.settings, self.durable, self.filter_subject)
        self._psub = await self.js.pull_subscribe_bind(self.durable, subjects.REQUEST_STREAM)
        self._cancel_sub = await self.nc.subscribe(subjects.CANCEL_SUBJECTS, cb=self._on_cancel)
        # Discovery and liveness for free: `$SRV.PING|INFO|STATS.llmbus-<service>`.
        self._micro = await nats.micro.add_service(
            self.nc,
            name=f"llmbus-{self.service}",
            version="0.1.0",
            description=f"llmbus {self.service} worker",
            metadata={"filter": self.filter_subject},
        )
        self._tasks = [asyncio.create_task(self._slot()) for _ in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._keep_alive()))

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop pulling, let in-flight jobs finish within `grace`, nak the rest."""
        self._stopping = True
        for task in list(self._idle):
            task.cancel()
        grace = self.settings.shutdown_grace_s if grace is None else grace
        jobs = [job.task for job in self._running.values() if job.task is not None]
        if jobs:
            await asyncio.wait(jobs, timeout=grace)
        for job in list(self._running.values()):
            job.cancel("shutdown")
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._cancel_sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
        if self._micro is not None:
            with contextlib.suppress(Exception):
                await self._micro.stop()

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject[len(subjects.CANCEL_PREFIX) :]
        job = self._running.get(request_id)
        if job is not None:
            job.cancel("client")
            return
        self._cancelled[request_id] = None
        if len(self._cancelled) > 10_000:
            self._cancelled.popitem(last=False)

    async def _keep_alive(self) -> None:
        """In-progress acks, so a generation longer than `ack_wait` is not redelivered."""
        interval = max(self.settings.ack_wait_s / 3, 0.2)
        while not self._stopping:
            await asyncio.sleep(interval)
            for job in list(self._running.values()):
                with contextlib.suppress(Exception):
                    await job.msg.in_progress()

    async def _slot(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping:
            self._idle.add(me)
            try:
                msgs = await self._psub.fetch(1, timeout=5)
            except (TimeoutError, NatsTimeoutError):
                continue
            except asyncio.CancelledError:
                return
            except Exception as exc:  # connection trouble: back off, the client reconnects
                log.warning("fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            finally:
                self._idle.discard(me)
            for msg in msgs:
                await self._process(msg)

    async def _process(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered or 1
        hdrs = msg.headers or {}
        try:
            request = self._decode(msg.data)
            request.validate()
        except (msgspec.DecodeError, msgspec.ValidationError, LlmbusError) as exc:
            await self._reject(msg, hdrs, attempt, exc)
            return
        reply = hdrs.get(headers.REPLY) or subjects.event_subject(request.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        if headers.DEADLINE in hdrs:
            with contextlib.suppress(ValueError):
                deadline = min(deadline, loop.time() + int(hdrs[headers.DEADLINE]) / 1000 - time.time())
        job = Job(self.nc, msg, request, reply=reply, attempt=attempt, deadline=deadline)

        with tracing.consume_span(msg.subject, request.id, hdrs, self.durable) as span:
            if request.id in self._cancelled:
                await job.fail(ErrorCode.CANCELLED, "cancelled by the client before it started")
            elif deadline <= loop.time():
                await job.fail(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it started")
            else:
                await self._run(job)
            if job.terminal:
                span.set_attribute("llmbus.outcome", "ok" if job.cancel_reason is None else job.cancel_reason)
                await msg.ack()
            else:
                await msg.nak()  # shutdown: another replica continues it

    async def _run(self, job: Job[R]) -> None:
        async def guarded() -> None:
            async with asyncio.timeout_at(job.deadline):
                await self.handler(job)

        job.task = asyncio.create_task(guarded())
        self._running[job.id] = job
        try:
            await asyncio.wait({job.task})
        finally:
            del self._running[job.id]
        if job.task.cancelled():
            if job.cancel_reason == "client":
                await job.fail(ErrorCode.CANCELLED, "cancelled by the client")
            elif job.attempt >= self.settings.max_deliver:
                await job.fail(ErrorCode.INTERNAL, "worker stopped and no deliveries are left")
            return  # shutdown: no terminal event, the message is nak'ed
        exc = job.task.exception()
        if job.terminal:
            if exc is not None:
                log.warning("request %s raised after its terminal event: %r", job.id, exc)
            return
        if exc is None:
            await job.fail(ErrorCode.INTERNAL, "the handler ended without a result")
        elif isinstance(exc, LlmbusError):
            await job.fail(exc.code, exc.message, exc.retry_after)
        elif isinstance(exc, TimeoutError):
            await job.fail(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        else:
            log.error("request %s failed", job.id, exc_info=exc)
            await job.fail(ErrorCode.INTERNAL, f"internal error; see the worker log for request {job.id}")

    async def _reject(self, msg: Msg, hdrs: dict[str, str], attempt: int, exc: Exception) -> None:
        """Poison: terminate it (never redeliver) and tell the sender if it said where to."""
        message = exc.message if isinstance(exc, LlmbusError) else f"malformed request: {exc}"
        reply = hdrs.get(headers.REPLY)
        if reply:
            error = Error(seq=0, attempt=attempt, code=ErrorCode.BAD_REQUEST, message=message)
            await self.nc.publish(reply, _encode(error))
        log.warning("terminated malformed message on %s: %s", msg.subject, message)
        await msg.term()
