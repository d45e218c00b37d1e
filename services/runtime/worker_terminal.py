"""The worker's terminal-guarantee stage: every request it runs ends with exactly one terminal event.

The handler publishes events through its `Job`; whatever it raises instead becomes an `error` event
with a stable code (`terminal_error`): an `LlmbusError` its own code, the deadline
`deadline_exceeded`, an event NATS refuses `request_too_large`, anything else `internal` (logged
with the request id; the client never sees a stack trace). A handler that returns without a
terminal event gets `internal`; one the client cancelled gets `cancelled`. A job stopped by a
shutdown gets none (its message is nak'ed and another replica continues it), unless no delivery
is left.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client
from nats.errors import MaxPayloadError

from contracts import ErrorCode, LlmbusError
from services.runtime.worker_deadline import Running, within_deadline
from services.runtime.worker_job import Handler, Job, R

log = logging.getLogger(__name__)


def terminal_error(exc: BaseException, request_id: str, max_payload: int) -> LlmbusError:
    """The error event a handler's failure becomes."""
    if isinstance(exc, LlmbusError):
        return exc
    if isinstance(exc, TimeoutError):
        return LlmbusError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed")
    if isinstance(exc, MaxPayloadError):  # an event NATS refuses: say so, never drop it
        return LlmbusError(
            ErrorCode.REQUEST_TOO_LARGE,
            f"an answer did not fit one NATS message (max_payload {max_payload} bytes): "
            "ask for less per request",
        )
    log.error("request %s failed", request_id, exc_info=exc)
    return LlmbusError(ErrorCode.INTERNAL, f"internal error; see the worker log for request {request_id}")


async def run_to_end(
    job: Job[R], handler: Handler[R], running: Running[R], *, max_deliver: int, nc: Client
) -> None:
    """Runs the handler as a cancellable task and guarantees the terminal event (see above)."""
    job.task = asyncio.create_task(within_deadline(handler, job))
    running.add(job)
    try:
        await asyncio.wait({job.task})
    finally:
        running.remove(job)
    if job.task.cancelled():
        if job.cancel_reason == "client":
            await job.fail(ErrorCode.CANCELLED, "cancelled by the client")
        elif job.attempt >= max_deliver:
            await job.fail(ErrorCode.INTERNAL, "worker stopped and no deliveries are left")
        return  # shutdown: no terminal event, the message is nak'ed
    exc = job.task.exception()
    if job.terminal:
        if exc is not None:
            log.warning("request %s raised after its terminal event: %r", job.id, exc)
        return
    if exc is None:
        await job.fail(ErrorCode.INTERNAL, "the handler ended without a result")
        return
    error = terminal_error(exc, job.id, nc.max_payload)
    await job.fail(error.code, error.message, error.retry_after)
