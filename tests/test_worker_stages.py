"""Each stage of the worker's consumer loop on its own (services/runtime/worker_*.py), against a
real nats-server: decode/reject, take-over, scope, deadline/cancel, the terminal guarantee, ack,
and the one `RequestEnded` record a terminal event becomes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from contracts import (
    Done,
    Error,
    ErrorCode,
    GenerateRequest,
    LlmbusError,
    Start,
    Timings,
    Token,
    Usage,
    headers,
    subjects,
)
from contracts.models import UsageEvent
from contracts.usage import Origin
from services.runtime import bus, dlq, logs, metrics, worker_deadline
from services.runtime.event_store import store_event
from services.runtime.settings import Settings
from services.runtime.worker_ack import settle
from services.runtime.worker_deadline import Running, deadline_of, refuse_unstartable, within_deadline
from services.runtime.worker_intake import REJECTED, Intake, sender_subject
from services.runtime.worker_job import Job
from services.runtime.worker_scope import request_scope
from services.runtime.worker_takeover import exhausted, still_running, take_over
from services.runtime.worker_terminal import run_to_end, terminal_error

MODEL = "llama3.2:1b"
_encode = msgspec.json.Encoder().encode


def body(request_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "id": request_id or uuid.uuid4().hex,
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        **fields,
    }


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await nats.connect(settings.nats_url)
    await bus.provision(conn.jetstream(), settings)
    yield conn
    await conn.close()


async def delivered(nc: Client, settings: Settings, data: bytes, hdrs: dict[str, str]) -> Msg:
    """Publishes a request and takes its delivery, as a worker's slot does."""
    js = nc.jetstream()
    await bus.ensure_consumer(js, settings, "stages", subjects.GENERATE_SUBJECTS)
    pull = await js.pull_subscribe_bind("stages", subjects.REQUEST_STREAM)
    await js.publish(subjects.generate_subject(MODEL), data, headers=hdrs)
    [msg] = await pull.fetch(1, timeout=5)
    return msg


async def job_for(
    nc: Client, settings: Settings, fields: dict[str, Any], deadline_s: float = 60, **hdrs: str
) -> Job[GenerateRequest]:
    msg = await delivered(nc, settings, _encode(fields), {headers.MSG_ID: fields["id"], **hdrs})
    request = msgspec.json.decode(msg.data, type=GenerateRequest)
    deadline = asyncio.get_running_loop().time() + deadline_s
    reply = hdrs.get(headers.REPLY) or subjects.event_subject(request.id)
    return Job(nc, msg, request, reply=reply, attempt=msg.metadata.num_delivered or 1, deadline=deadline)


async def queued(nc: Client) -> int:
    """Requests still in the work queue (an acked or terminated one is gone)."""
    return (await nc.jetstream().stream_info(subjects.REQUEST_STREAM)).state.messages


async def until(check: Any, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


# -- 1. decode and validate, or reject -------------------------------------------------------------


async def test_intake_decodes_a_request_and_where_its_events_go(nc: Client) -> None:
    intake = Intake(nc, "generator", GenerateRequest)
    fields = body()
    request, reply = intake.decode(_encode(fields), {})
    assert request.id == fields["id"] and reply == subjects.event_subject(fields["id"])
    inbox = f"{subjects.PUBLISHER_INBOX}me"
    assert intake.decode(_encode(fields), {headers.REPLY: inbox})[1] == inbox


@pytest.mark.parametrize(
    ("data", "hdrs"),
    [
        (b"{not json", {}),
        (_encode(body(messages=[])), {}),
        (_encode(body(id="has space")), {}),
        (_encode(body()), {headers.REPLY: "llm.out.someone-else"}),
        (b"[" * 100_000, {}),
    ],
)
def test_intake_refuses_what_does_not_decode_or_validate(data: bytes, hdrs: dict[str, str]) -> None:
    intake: Intake[GenerateRequest] = Intake(None, "generator", GenerateRequest)  # type: ignore[arg-type]
    with pytest.raises(REJECTED):
        intake.decode(data, hdrs)


def test_a_rejected_sender_is_told_on_its_own_subject_only() -> None:
    inbox = f"{subjects.PUBLISHER_INBOX}me"
    assert sender_subject(b"{not json", {headers.REPLY: inbox}) == inbox
    assert sender_subject(_encode(body("r-000001")), {}) == "llm.out.r-000001"
    assert sender_subject(b"{not json", {headers.MSG_ID: "r-000002"}) == "llm.out.r-000002"
    # A subject another request owns is not believed: the sender hears on its own.
    assert sender_subject(_encode(body("r-000003")), {headers.REPLY: "llm.out.other"}) == "llm.out.r-000003"
    assert sender_subject(b"{not json", {}) is None


async def test_a_rejected_delivery_is_dead_lettered_terminated_and_its_sender_told(
    nc: Client, settings: Settings
) -> None:
    inbox = f"{subjects.PUBLISHER_INBOX}{uuid.uuid4().hex}"
    events = await nc.subscribe(inbox)
    msg = await delivered(nc, settings, b"{not json", {headers.REPLY: inbox})
    intake = Intake(nc, "generator", GenerateRequest)
    assert await intake.admit(msg, msg.headers or {}, 1) is None
    error = json.loads((await events.next_msg(5)).data)
    assert error["type"] == "error" and error["code"] == "bad_request" and error["seq"] == 0
    [entry] = await dlq.entries(nc)
    assert entry.reason.startswith("rejected: malformed request") and entry.service == "generator"
    assert await queued(nc) == 0  # terminated: never redelivered


# -- 2. take-over ----------------------------------------------------------------------------------


async def test_a_redelivery_continues_after_the_events_already_published(
    nc: Client, settings: Settings
) -> None:
    fields = body()
    reply = subjects.event_subject(fields["id"])
    await nc.publish(reply, _encode(Start(seq=0, attempt=1, request_id=fields["id"], model=MODEL)))
    for seq, text in enumerate(["Rivers ", "flow"], start=1):
        await nc.publish(reply, _encode(Token(seq=seq, attempt=1, text=text)))
    await nc.flush()
    job = await job_for(nc, settings, fields)
    assert await still_running(None, job.msg) is False
    assert await take_over(nc, job) is True
    assert (job.seq, job.continued, job.prior_text, job.prior_tokens) == (3, True, "Rivers flow", 2)


async def test_a_redelivery_of_a_request_that_ended_is_only_acked(nc: Client, settings: Settings) -> None:
    fields = body()
    usage, timings = Usage(1, 1, 2), Timings(total_ms=1.0)
    done = Done(seq=0, attempt=1, finish_reason="stop", usage=usage, timings=timings)
    await store_event(nc, subjects.event_subject(fields["id"]), _encode(done), "x")
    job = await job_for(nc, settings, fields)
    assert await take_over(nc, job) is False
    await until(lambda: _is(queued(nc), 0))


async def test_a_request_that_exhausted_its_deliveries_is_dead_lettered_with_one_error(
    nc: Client, settings: Settings
) -> None:
    fields = body()
    events = await nc.subscribe(subjects.event_subject(fields["id"]))
    job = await job_for(nc, settings, fields)
    job.attempt = settings.max_deliver + 1
    await exhausted(nc, "generator", job)
    error = json.loads((await events.next_msg(5)).data)
    assert error["code"] == "internal" and f"{settings.max_deliver} deliveries" in error["message"]
    [entry] = await dlq.entries(nc)
    assert entry.request_id == fields["id"] and entry.deliveries == settings.max_deliver
    await until(lambda: _is(queued(nc), 0))


async def test_a_redelivery_of_a_running_job_is_kept_by_it(nc: Client, settings: Settings) -> None:
    job = await job_for(nc, settings, body())
    newer = await delivered(nc, settings, b"{}", {})
    assert await still_running(job, newer) is True
    assert job.msg is newer  # the job acks this newest delivery when done


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# -- 3. scope ----------------------------------------------------------------------------------------


async def test_the_scope_names_the_request_in_logs_and_opens_a_consumer_span(
    nc: Client, settings: Settings, spans: InMemorySpanExporter
) -> None:
    job = await job_for(nc, settings, body())
    with request_scope(job, job.msg.headers or {}, "generator"):
        assert logs.request_id.get() == job.id
    assert logs.request_id.get() is None
    [span] = spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["messaging.consumer.group.name"] == "generator"
    assert span.attributes["messaging.message.id"] == job.id


# -- 4. deadline and cancel ----------------------------------------------------------------------


def test_the_deadline_is_the_timeout_or_the_earlier_header() -> None:
    now = 1000.0
    assert deadline_of({}, 600, now) == now + 600
    soon = deadline_of({headers.DEADLINE: str(int((time.time() + 5) * 1000))}, 600, now)
    assert now + 4 < soon <= now + 5.01
    late = {headers.DEADLINE: str(int((time.time() + 9000) * 1000))}
    assert deadline_of(late, 600, now) == now + 600
    assert deadline_of({headers.DEADLINE: "soon"}, 600, now) == now + 600  # garbage is ignored


async def test_a_cancel_before_the_request_is_remembered_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_deadline, "EARLY_CANCELS", 2)
    running: Running[GenerateRequest] = Running()
    for request_id in ("a", "b", "c"):
        running.cancel(request_id)
    assert not running.cancelled_early("a") and running.cancelled_early("b") and running.cancelled_early("c")


async def test_a_request_cancelled_or_expired_before_it_started_is_never_run(
    nc: Client, settings: Settings
) -> None:
    running: Running[GenerateRequest] = Running()
    cancelled = await job_for(nc, settings, body())
    running.cancel(cancelled.id)
    assert await refuse_unstartable(cancelled, running)
    assert isinstance(cancelled.ended_with, Error) and cancelled.ended_with.code == ErrorCode.CANCELLED
    await settle(cancelled, _no_span())

    expired = await job_for(nc, settings, body(), deadline_s=-1)
    assert await refuse_unstartable(expired, running)
    assert isinstance(expired.ended_with, Error) and expired.ended_with.code == ErrorCode.DEADLINE_EXCEEDED
    await settle(expired, _no_span())

    fresh = await job_for(nc, settings, body())
    assert not await refuse_unstartable(fresh, running) and not fresh.terminal


async def test_a_running_handler_is_stopped_at_the_deadline(nc: Client, settings: Settings) -> None:
    job = await job_for(nc, settings, body(), deadline_s=0.1)

    async def slow(job: Job[GenerateRequest]) -> None:
        await asyncio.sleep(5)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await within_deadline(slow, job)
    assert time.monotonic() - started < 1


def _no_span() -> Any:
    from opentelemetry.trace import INVALID_SPAN

    return INVALID_SPAN


# -- 5. the terminal guarantee ---------------------------------------------------------------------


def test_a_handlers_failure_becomes_an_error_with_a_stable_code() -> None:
    own = LlmbusError(ErrorCode.MODEL_NOT_FOUND, "no such model", retry_after=2.0)
    assert terminal_error(own, "r", 1024) is own
    assert terminal_error(TimeoutError(), "r", 1024).code == ErrorCode.DEADLINE_EXCEEDED
    too_big = terminal_error(nats.errors.MaxPayloadError(), "r", 1024)
    assert too_big.code == ErrorCode.REQUEST_TOO_LARGE and "1024" in too_big.message
    bug = terminal_error(ZeroDivisionError("boom"), "r-7", 1024)
    assert bug.code == ErrorCode.INTERNAL and "r-7" in bug.message and "boom" not in bug.message


async def ended_by(nc: Client, settings: Settings, handler: Any, *, cancel: str | None = None) -> Job[Any]:
    job = await job_for(nc, settings, body())
    running: Running[GenerateRequest] = Running()
    run = asyncio.create_task(run_to_end(job, handler, running, max_deliver=settings.max_deliver, nc=nc))
    if cancel is not None:
        await until(lambda: _true(running.get(job.id) is not None))
        if cancel == "client":
            running.cancel(job.id)
        else:
            job.cancel(cancel)
    await run
    assert len(running) == 0
    return job


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        ("return", ErrorCode.INTERNAL),
        ("raise", ErrorCode.MODEL_NOT_FOUND),
        ("bug", ErrorCode.INTERNAL),
        ("done", None),
    ],
)
async def test_every_run_ends_with_exactly_one_terminal_event(
    nc: Client, settings: Settings, outcome: str, code: ErrorCode | None
) -> None:
    async def handler(job: Job[GenerateRequest]) -> None:
        await job.start(MODEL)
        if outcome == "raise":
            raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, "no such model")
        if outcome == "bug":
            raise KeyError("a bug")
        if outcome == "done":
            await job.done("stop", Usage(1, 1, 2), Timings(total_ms=1.0))
            raise RuntimeError("after the end: logged, not a second event")

    job = await ended_by(nc, settings, handler)
    assert job.terminal
    assert (job.ended_with.code if isinstance(job.ended_with, Error) else None) == code


async def test_a_cancelled_run_ends_cancelled_for_the_client_and_not_at_all_for_a_shutdown(
    nc: Client, settings: Settings
) -> None:
    async def forever(job: Job[GenerateRequest]) -> None:
        await asyncio.sleep(30)

    by_client = await ended_by(nc, settings, forever, cancel="client")
    assert isinstance(by_client.ended_with, Error) and by_client.ended_with.code == ErrorCode.CANCELLED
    by_shutdown = await ended_by(nc, settings, forever, cancel="shutdown")
    assert not by_shutdown.terminal  # nak'ed: another replica continues it


# -- 6. ack -----------------------------------------------------------------------------------------


async def test_an_ended_request_is_acked_and_an_unended_one_redelivered(
    nc: Client, settings: Settings
) -> None:
    job = await job_for(nc, settings, body())
    await settle(job, _no_span())  # not ended (a shutdown): nak'ed at once
    pull = await nc.jetstream().pull_subscribe_bind("stages", subjects.REQUEST_STREAM)
    [again] = await pull.fetch(1, timeout=5)
    assert again.metadata.num_delivered == 2
    job.msg = again
    await job.fail(ErrorCode.CANCELLED, "cancelled")
    await settle(job, _no_span())
    await until(lambda: _is(queued(nc), 0))


# -- the terminal event's store and its one record ----------------------------------------------------


async def test_a_terminal_event_is_stored_once_however_often_it_is_retried(nc: Client) -> None:
    subject = subjects.event_subject(uuid.uuid4().hex)
    for _ in range(3):
        await store_event(nc, subject, b'{"type":"done"}', "same-id")
    info = await nc.jetstream().stream_info(subjects.EVENT_STREAM, subjects_filter=subject)
    assert info.state.messages == 1


async def test_a_terminal_event_that_cannot_be_stored_fails_within_the_patience(settings: Settings) -> None:
    conn = await nats.connect(settings.nats_url)  # no LLM_OUT: nobody answers the publish
    try:
        started = time.monotonic()
        with pytest.raises(LlmbusError) as failure:
            await store_event(conn, subjects.event_subject("r-1"), b"{}", "r-1.1.0", patience_s=0.5)
        assert failure.value.code == ErrorCode.BACKEND_UNAVAILABLE
        assert 0.02 < time.monotonic() - started < 3  # retried, then gave up in time
    finally:
        await conn.close()


async def test_one_request_ended_record_feeds_metrics_usage_and_the_log(
    nc: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    usage_events = await nc.subscribe(subjects.usage_subject(MODEL))
    origin = Origin(tenant="acme", api="openai", model="auto", accepted_ms=int(time.time() * 1000) - 50)
    job = await job_for(nc, settings, body(), **{headers.ORIGIN: _encode(origin).decode()})
    job.host = "ollama:11434"
    labels = {"subject": "llm.req.generate", "model": MODEL, "code": "ok"}
    before = metrics.WORKER_REQUESTS.labels(*labels.values())._value.get()
    with caplog.at_level(logging.DEBUG, logger="llmbus.worker"):
        await job.done("stop", Usage(7, 3, 10), Timings(total_ms=5.0, ttft_ms=1.5, tokens_per_s=80.0))
    assert metrics.WORKER_REQUESTS.labels(*labels.values())._value.get() == before + 1
    [line] = [r for r in caplog.records if r.getMessage() == "request ended"]
    assert line.__dict__["code"] == "ok" and line.__dict__["model"] == MODEL
    report = msgspec.json.decode((await usage_events.next_msg(5)).data, type=UsageEvent)
    assert (report.request_id, report.kind, report.outcome, report.host) == (
        job.id,
        "generate",
        "done",
        job.host,
    )
    assert (report.prompt_tokens, report.completion_tokens, report.ttft_ms) == (7, 3, 1.5)
    assert (report.tenant, report.api, report.requested_model) == ("acme", "openai", "auto")
    assert report.queued_ms is not None and report.queued_ms >= 0
