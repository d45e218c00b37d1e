"""The worker's last stage: the message is acked once its request ended, else nak'ed.

The terminal event is stored in `LLM_OUT` before this (`Job.emit`), so the ack never loses an
ending; a job without one (a shutdown stopped it) is nak'ed at once, so another replica continues
it. A job that handed its request on (`Job.hand_off`) counts as ended here.
"""

from __future__ import annotations

import contextlib
import logging

from nats.aio.msg import Msg
from opentelemetry.trace import Span

from services.runtime import tracing
from services.runtime.worker_job import Job, R

log = logging.getLogger(__name__)


async def settle(job: Job[R], span: Span) -> None:
    if job.terminal:
        tracing.request_ended(span, job.ended_with, job.cancel_reason)
        await job.msg.ack()  # the newest delivery of it (see worker_takeover.still_running)
    else:
        await job.msg.nak()  # shutdown: another replica continues it


async def redeliver_soon(msg: Msg) -> None:
    """A request left unfinished by a failure (NATS gone longer than the store's patience)."""
    log.exception("request on %s not finished; it will be redelivered", msg.subject)
    with contextlib.suppress(Exception):
        await msg.nak(delay=1)
