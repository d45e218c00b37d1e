"""The one consumer loop every worker service runs.

A `Worker` pulls requests from a durable JetStream consumer with bounded concurrency and hands
each to a handler as a `Job`. It owns everything that must be done the same way everywhere:

* decode and validate (a malformed message is terminated, never redelivered, and the sender gets an
  `error` event when it named a reply subject);
* exactly one terminal event per request: whatever the handler raises becomes an `error` event
  with a stable code, a handler that returns without one gets `internal`;
* cancellation (`llm.cancel.<id>`, also for requests not started yet), deadlines, in-progress acks
  while a long generation runs, ack after the terminal event, which JetStream has acknowledged;
* taking over after a crash: a redelivered request first reads what it already published in
  `LLM_OUT`; if it ended, it is just acked, otherwise the job continues after it (`Job.prior_text`,
  numbering after the last `seq`, no second `start`);
* dead letters: a message that does not decode, or that comes back once more than `max_deliver`
  allows (every worker that took it died), is copied to `LLM_DLQ` with the reason, and its sender
  gets a terminal `error`; the worker counts deliveries itself, so it never reads or deletes a
  message it was not handed (its NATS user may not: services/runtime/nats_auth.py);
* after NATS reconnects (`bus.reconnects`): re-creates what a restarted server lost (streams, its
  consumer) and republishes the events that did not reach `LLM_OUT`;
* the batch lane (`llm.req.batch.<kind>.<model>`, a durable of its own): at most
  `LLMBUS_BATCH_SLOTS` batch lines at once, each started only while the worker has a slot free of
  interactive work. A free slot is always pulling interactive requests, so a free slot here means no
  interactive request for these models is waiting anywhere: batch work fills idle capacity only;
* graceful drain: on stop, no new pulls, in-flight jobs get a grace period, the rest are nak'ed so
  another replica takes them;
* a consumer span per request, child of the publisher's trace context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import msgspec
import nats.micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from contracts import (
    TERMINAL_EVENTS,
    Done,
    Error,
    ErrorCode,
    Event,
    LlmbusError,
    Restart,
    Start,
    Timings,
    Token,
    ToolCall,
    Usage,
    headers,
    subjects,
)
from services.runtime import bus, dlq, events, logs, metrics, tracing, usage
from services.runtime.retry import Backoff, with_backoff
from services.runtime.settings import Settings

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode

# How long a worker keeps trying to get a terminal event stored (NATS restarting, a cluster
# electing a leader) before it gives up and lets JetStream redeliver the request.
STORE_PATIENCE_S = 30.0
# Events a job keeps to republish what a lost NATS connection swallowed (only the newest can be).
RESEND_WINDOW = 1024
# Free slots with a pull request outstanding at once. Each re-issues its pull every 5 s, so one
# per slot made an idle worker sized for 256 requests cost NATS and itself ~7 % of a core; the
# other free slots wait their turn (a pull is one round trip, so a burst still ramps up in ms).
FETCHERS = 16


class Request(Protocol):
    id: str

    def validate(self) -> None: ...


R = TypeVar("R", bound=Request)


class Job(Generic[R]):
    """One delivery of one request: the handler's way to publish events."""

    __slots__ = (
        "_nc",
        "_sent",
        "attempt",
        "cancel_reason",
        "continued",
        "deadline",
        "ended_with",
        "host",
        "msg",
        "prior_calls",
        "prior_text",
        "prior_thinking",
        "prior_tokens",
        "reply",
        "request",
        "seq",
        "started",
        "task",
        "terminal",
    )

    def __init__(
        self, nc: Client, msg: Msg, request: R, *, reply: str, attempt: int, deadline: float, seq: int = 0
    ) -> None:
        self._nc = nc
        self.msg = msg
        self.request = request
        self.reply = reply
        self.attempt = attempt
        self.deadline = deadline  # event-loop time
        self.seq = seq
        self.continued = seq > 0  # an earlier hop (the classifier) already published `start`
        # The answer's text an earlier attempt already streamed (a generator continues after it).
        self.prior_text = ""
        self.prior_tokens = 0  # ... in this many token events
        self.prior_thinking = ""  # ... its reasoning text
        self.prior_calls: list[ToolCall] = []  # ... and the tool calls it delivered (never sent twice)
        self._sent: deque[bytes] = deque(maxlen=RESEND_WINDOW)  # the newest events, ending at seq - 1
        self.terminal = False
        self.started = time.perf_counter()
        self.cancel_reason: str | None = None
        self.ended_with: Event | None = None  # the terminal event (its span's outcome)
        self.task: asyncio.Task[None] | None = None
        self.host = ""  # the model server this worker calls (recorded in the usage event)

    @property
    def id(self) -> str:
        return self.request.id

    async def emit(self, event: Event) -> None:
        if self.terminal:
            raise RuntimeError(f"request {self.id} already ended")
        if isinstance(event, TERMINAL_EVENTS):
            # Stored before the request is acked: a worker that takes over sees that it ended.
            await self._store(_encode(event))
            self.terminal = True
            self.ended_with = event
            metrics.worker_request_ended(self, event)
            await usage.publish(self._nc, self, event, self.host)  # the janitor's last use, the ledger's row
        else:
            data = _encode(event)
            self._sent.append(data)
            await self._nc.publish(self.reply, data)
        self.seq += 1

    async def _store(self, data: bytes) -> None:
        await store_event(self._nc, self.reply, data, f"{self.id}.{self.attempt}.{self.seq}")

    async def restart(self, reason: str) -> None:
        """Voids the text streamed so far (`prior_text`): for a backend that cannot continue it."""
        await self.emit(Restart(seq=self.seq, attempt=self.attempt, reason=reason))
        self.prior_text = ""
        self.prior_tokens = 0
        self.prior_thinking = ""

    async def start(self, model: str) -> None:
        if self.continued:
            return
        await self.emit(Start(seq=self.seq, attempt=self.attempt, request_id=self.id, model=model))

    async def token(self, text: str) -> None:
        # The hot path: one small struct and one encode per token, no headers, no logging.
        data = _encode(Token(seq=self.seq, attempt=self.attempt, text=text))
        self._sent.append(data)
        await self._nc.publish(self.reply, data)
        self.seq += 1

    async def resend_lost(self) -> int:
        """After a reconnect: republishes the events that never reached LLM_OUT; returns how many.

        Events written to a connection that died are gone (they reached neither the stream nor
        the client); readers drop the copies of those that did arrive.
        """
        if not self._sent or not self.reply.startswith(subjects.EVENT_PREFIX):
            return 0
        first = self.seq - len(self._sent)
        sent = list(self._sent)
        stored = {head.seq for head, _ in await events.read(self._nc, self.reply)}
        missing = [data for i, data in enumerate(sent) if first + i not in stored]
        for data in missing:
            await self._nc.publish(self.reply, data)
        return len(missing)

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

    def hand_off(self) -> None:
        """This hop is done and another worker continues (and ends) the request: ack, no terminal event."""
        self.terminal = True

    def cancel(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            self.cancel_reason = reason
            self.task.cancel()


async def store_event(nc: Client, subject: str, data: bytes, msg_id: str) -> None:
    """Publishes an event with JetStream's acknowledgement, retrying (de-duplicated) within a bound.

    Raises `LlmbusError(backend_unavailable)` when it cannot within `STORE_PATIENCE_S`.
    """
    if not subject.startswith(subjects.EVENT_PREFIX):  # not kept in LLM_OUT: nobody acks it
        await nc.publish(subject, data)
        return
    js = nc.jetstream()
    hdrs = {headers.MSG_ID: msg_id}
    loop = asyncio.get_running_loop()
    give_up = loop.time() + STORE_PATIENCE_S
    delay = 0.05
    while True:
        try:
            await js.publish(subject, data, headers=hdrs, timeout=2)
            return
        except (NatsTimeoutError, NoRespondersError, NoStreamResponseError, TimeoutError) as exc:
            if loop.time() + delay > give_up:
                raise LlmbusError(ErrorCode.BACKEND_UNAVAILABLE, "cannot store the event in LLM_OUT") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


Handler = Callable[[Job[R]], Awaitable[None]]


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
        batch_filter_subject: str | list[str] | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self.service = service
        self.durable = durable or service  # replicas with the same filter share one consumer
        self.filter_subject = filter_subject
        self.handler = handler
        self.concurrency = concurrency or settings.concurrency
        self.batch_filter_subject = batch_filter_subject
        self.batch_durable = f"{self.durable}-batch"
        self.batch_slots = settings.batch_slots if batch_filter_subject else 0
        self._freed = asyncio.Condition()  # a job ended: a batch slot may start the next line
        # Until then (event-loop time) a first delivery may be a repeat: a NATS killed before it
        # wrote its consumers' state hands out again, as first deliveries, what it had delivered.
        self._repeats_until = 0.0
        self._decode = msgspec.json.Decoder(request_type).decode
        self._running: dict[str, Job[R]] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # cancels that came before the request
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
            metadata={"filter": ",".join(bus.filters(self.filter_subject))},
        )
        self._tasks = [asyncio.create_task(self._slot()) for _ in range(self.concurrency)]
        if self.batch_slots:
            self._batch_psub = await self.js.pull_subscribe_bind(self.batch_durable, subjects.REQUEST_STREAM)
            self._tasks += [asyncio.create_task(self._batch_slot()) for _ in range(self.batch_slots)]
        self._keeper = asyncio.create_task(self._keep_alive())
        self._tasks.append(self._keeper)
        self._unsubscribe_reconnects = bus.reconnects(self.nc).subscribe(self._after_reconnect)
        metrics.watch_worker(self, self.settings.http_host, self.settings.metrics_port)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop pulling, let in-flight jobs finish within `grace`, nak the rest."""
        self._stopping = True
        for task in list(self._idle):
            task.cancel()
        grace = self.settings.shutdown_grace_s if grace is None else grace
        jobs = [job.task for job in self._running.values() if job.task is not None]
        if jobs:
            await asyncio.wait(jobs, timeout=grace)
        # No interest first: the server then drops this process's pending pull requests, so what
        # is nak'ed next goes straight to another replica instead of back here.
        with contextlib.suppress(Exception):
            await self._psub.unsubscribe()
        if self.batch_slots:
            with contextlib.suppress(Exception):
                await self._batch_psub.unsubscribe()
        for job in list(self._running.values()):
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
        request_id = msg.subject[len(subjects.CANCEL_PREFIX) :]
        job = self._running.get(request_id)
        if job is not None:
            job.cancel("client")
            return
        self._cancelled[request_id] = None
        if len(self._cancelled) > 10_000:
            self._cancelled.popitem(last=False)

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
        for job in list(self._running.values()):
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
            for job in list(self._running.values()):
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
                log.exception("request on %s not finished; it will be redelivered", msg.subject)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1)

    async def _process(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered or 1
        hdrs = msg.headers or {}
        try:
            request = self._decode(msg.data)
            request.validate()
            reply = hdrs.get(headers.REPLY) or subjects.event_subject(request.id)
            if not subjects.valid_reply(reply, request.id):
                raise LlmbusError(
                    ErrorCode.BAD_REQUEST,
                    f"{headers.REPLY} must be the request's own llm.out.<id> or an inbox under "
                    f"{subjects.PUBLISHER_INBOX} (got {reply[:80]!r})",
                )
        except (msgspec.DecodeError, msgspec.ValidationError, LlmbusError, RecursionError) as exc:
            await self._reject(msg, hdrs, attempt, exc)
            return
        running = self._running.get(request.id)
        if running is not None:
            # Redelivered while it still runs here (in-progress acks were lost, e.g. during a NATS
            # leader election): keep the running job, which acks this newest delivery when done.
            running.msg = msg
            with contextlib.suppress(Exception):
                await msg.in_progress()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        if headers.DEADLINE in hdrs:
            with contextlib.suppress(ValueError):
                deadline = min(deadline, loop.time() + int(hdrs[headers.DEADLINE]) / 1000 - time.time())
        seq = int(hdrs[headers.SEQ]) if hdrs.get(headers.SEQ, "").isdigit() else 0
        job = Job(self.nc, msg, request, reply=reply, attempt=attempt, deadline=deadline, seq=seq)
        job.host = self.host
        repeat = attempt > 1 or loop.time() < self._repeats_until
        if repeat and not await self._take_over(job):
            return
        if attempt > self.settings.max_deliver:
            await self._exhausted(job)
            return

        with (
            logs.request_scope(request.id),
            tracing.consume_span(msg.subject, request.id, hdrs, self.durable) as span,
        ):
            if request.id in self._cancelled:
                await job.fail(ErrorCode.CANCELLED, "cancelled by the client before it started")
            elif deadline <= loop.time():
                await job.fail(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed before it started")
            else:
                await self._run(job)
            if job.terminal:
                tracing.request_ended(span, job.ended_with, job.cancel_reason)
                await job.msg.ack()  # the newest delivery of it (see above)
            else:
                await job.msg.nak()  # shutdown: another replica continues it

    async def _take_over(self, job: Job[R]) -> bool:
        """A redelivery: continue after what an earlier attempt published; False if nothing is left."""
        try:
            prior = events.published(await events.read(self.nc, job.reply))
        except (NatsTimeoutError, TimeoutError):
            await job.msg.nak(delay=1)  # cannot tell what was published yet: try again shortly
            return False
        if prior.ended:
            await job.msg.ack()  # it ended, but its worker stopped before acking
            return False
        if not prior.empty:
            job.seq = max(job.seq, prior.next_seq)
            job.continued = job.continued or prior.started
            job.prior_text = prior.text
            job.prior_tokens = prior.tokens
            job.prior_thinking = prior.thinking
            job.prior_calls = prior.tool_calls
        return True

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
            async with self._freed:
                self._freed.notify_all()
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
        elif isinstance(exc, MaxPayloadError):  # an event NATS refuses: say so, never drop it
            await job.fail(
                ErrorCode.REQUEST_TOO_LARGE,
                f"an answer did not fit one NATS message (max_payload {self.nc.max_payload} bytes): "
                "ask for less per request",
            )
        else:
            log.error("request %s failed", job.id, exc_info=exc)
            await job.fail(ErrorCode.INTERNAL, f"internal error; see the worker log for request {job.id}")

    async def _reject(self, msg: Msg, hdrs: dict[str, str], attempt: int, exc: Exception) -> None:
        """Poison: tell the sender where it listens, dead-letter it, terminate it (no redelivery)."""
        message = exc.message if isinstance(exc, LlmbusError) else f"malformed request: {exc}"
        reply = hdrs.get(headers.REPLY)
        # The body's id, or the `Nats-Msg-Id` it was published under when the body cannot be read
        # (the contract makes them the same): the sender listens on that request's subject.
        request_id = dlq.request_id_of(msg.data) or hdrs.get(headers.MSG_ID)
        if not reply or not subjects.valid_reply(reply, request_id):
            # The sender listens on its request's default subject (or named one nobody could hear).
            default = subjects.event_subject(request_id) if request_id is not None else ""
            reply = default if subjects.valid_reply(default, request_id) else None
        if reply:
            error = Error(seq=0, attempt=attempt, code=ErrorCode.BAD_REQUEST, message=message)
            await self.nc.publish(reply, _encode(error))
        await dlq.dead_letter(
            self.nc,
            service=self.service,
            subject=msg.subject,
            data=msg.data,
            original_headers=hdrs,
            reason=f"rejected: {message}",
            deliveries=attempt,
        )
        log.warning("dead-lettered malformed message on %s: %s", msg.subject, message)
        metrics.worker_request_rejected(msg.subject)
        await msg.term()

    async def _exhausted(self, job: Job[R]) -> None:
        """Every allowed delivery ended without an ack (the workers that took it died): it is not
        run again but dead-lettered, and its client gets one `error` (its earlier attempts'
        events stay; `_take_over` already acked one that had ended)."""
        deliveries = job.attempt - 1
        reason = f"gave up after {deliveries} deliveries: every worker that took it stopped before it ended"
        await dlq.dead_letter(
            self.nc,
            service=self.service,
            subject=job.msg.subject,
            data=job.msg.data,
            original_headers=job.msg.headers,
            reason=reason,
            deliveries=deliveries,
        )
        with logs.request_scope(job.id):
            await job.fail(ErrorCode.INTERNAL, reason)
            await job.msg.ack()
            log.warning("dead-lettered request %s: %s", job.id, reason)
