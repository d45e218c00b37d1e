"""The worker's second stage: a redelivered request, taken over or given up.

A request comes back when the worker that had it died (or lost its in-progress acks). Its new
worker first reads what was already published in `LLM_OUT`: a request that ended is only acked; one
that did not continues after its events (`Job.prior_text`, numbering after the last `seq`, no
second `start`). The delivery after `max_deliver` is not run again but dead-lettered, and its client
gets one `error` (the worker counts deliveries itself, so it never reads or deletes a message it
was not handed: its NATS user may not, services/runtime/nats_roles.py).
"""

from __future__ import annotations

import contextlib
import logging

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from contracts import ErrorCode
from services.runtime import dlq, events, logs
from services.runtime.worker_job import Job, R

log = logging.getLogger(__name__)


async def still_running(running: Job[R] | None, msg: Msg) -> bool:
    """Redelivered while it still runs here (in-progress acks were lost, e.g. during a NATS leader
    election): the running job keeps it, and acks this newest delivery when done."""
    if running is None:
        return False
    running.msg = msg
    with contextlib.suppress(Exception):
        await msg.in_progress()
    return True


async def take_over(nc: Client, job: Job[R]) -> bool:
    """A redelivery: continue after what an earlier attempt published; False if nothing is left."""
    try:
        prior = events.published(await events.read(nc, job.reply))
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


async def exhausted(nc: Client, service: str, job: Job[R]) -> None:
    """Every allowed delivery ended without an ack (the workers that took it died): it is not
    run again but dead-lettered, and its client gets one `error` (its earlier attempts'
    events stay; `take_over` already acked one that had ended)."""
    deliveries = job.attempt - 1
    reason = f"gave up after {deliveries} deliveries: every worker that took it stopped before it ended"
    await dlq.dead_letter(
        nc,
        service=service,
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
