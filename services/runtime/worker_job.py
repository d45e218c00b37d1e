"""`Job`: one delivery of one request, the handler's way to publish its events.

Tokens go out as core publishes (the hot path: one small struct and one encode each); the terminal
event is stored in `LLM_OUT` first (`event_store`), then it becomes the request's one
`RequestEnded` record, which feeds the worker's metrics, the usage event and the log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts import (
    TERMINAL_EVENTS,
    Done,
    Error,
    ErrorCode,
    Event,
    Restart,
    Start,
    Timings,
    Token,
    ToolCall,
    Usage,
    subjects,
)
from services.runtime import events, metrics, usage
from services.runtime.event_store import store_event
from services.runtime.request_ended import RequestEnded

_encode = msgspec.json.Encoder().encode
_ended_log = logging.getLogger("llmbus.worker")

# Events a job keeps to republish what a lost NATS connection swallowed (only the newest can be).
RESEND_WINDOW = 1024


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
            await report(self._nc, ended(self, event))
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


Handler = Callable[[Job[R]], Awaitable[None]]


def ended(job: Job[R], event: object) -> RequestEnded:
    """The one record of how this delivery ended, from its terminal event."""
    now = time.time()
    duration = time.perf_counter() - job.started
    model = getattr(job.request, "model", None)
    tokens = getattr(event, "usage", None)
    timings = getattr(event, "timings", None)
    return RequestEnded(
        request_id=job.id,
        subject=job.msg.subject,
        model=model if isinstance(model, str) else "",
        error=str(event.code) if isinstance(event, Error) else None,
        attempt=job.attempt,
        host=job.host,
        started_at=now - duration,
        ended_at=now,
        prompt_tokens=int(getattr(tokens, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(tokens, "completion_tokens", 0) or 0),
        ttft_ms=getattr(timings, "ttft_ms", None),
        tokens_per_s=getattr(timings, "tokens_per_s", None),
        headers=job.msg.headers or {},
        stored_at=_stored_at(job.msg),
        content=getattr(job, "recorded", None),  # LLMBUS_LEDGER_CONTENT=on (services/runtime/transcript.py)
    )


async def report(nc: Client, record: RequestEnded) -> None:
    """Metrics, the log line and the usage event (the janitor's last use, the ledger's row)."""
    metrics.worker_request_ended(record)
    if _ended_log.isEnabledFor(logging.DEBUG):  # (its fields are not built for nothing)
        _ended_log.debug(
            "request ended",
            extra={
                "subject": record.family,
                "model": record.model,
                "code": record.code,
                "attempt": record.attempt,
                "duration_ms": round(record.duration_s * 1000, 3),
            },
        )
    await usage.publish(nc, record)


def _stored_at(msg: Msg) -> float | None:
    """When JetStream stored the request (a direct publisher sends no `Llmbus-Origin`)."""
    with contextlib.suppress(Exception):
        stamp = msg.metadata.timestamp
        return float(stamp.timestamp()) if stamp is not None else None
    return None
