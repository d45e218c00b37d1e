"""Storing a terminal event in `LLM_OUT`, acknowledged by JetStream, before the request is acked.

A worker that takes over reads the stream to learn whether a request ended, so the terminal event
must be stored (not just published) first. NATS restarting or a cluster electing a leader is
waited out within `STORE_PATIENCE_S`, through the runtime's one retry loop.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError

from contracts import ErrorCode, LlmbusError, headers, subjects
from services.runtime.retry import Backoff, with_backoff

# How long a worker keeps trying to get a terminal event stored (NATS restarting, a cluster
# electing a leader) before it gives up and lets JetStream redeliver the request.
STORE_PATIENCE_S = 30.0
# Short first waits, at most a second apart: bounded by the patience, not by the count.
STORE_BACKOFF = Backoff(retries=100, base_s=0.05, max_s=1.0)
_TRANSIENT = (NatsTimeoutError, NoRespondersError, NoStreamResponseError, TimeoutError)


async def store_event(
    nc: Client, subject: str, data: bytes, msg_id: str, *, patience_s: float = STORE_PATIENCE_S
) -> None:
    """Publishes an event with JetStream's acknowledgement, retrying (de-duplicated by `msg_id`).

    Raises `LlmbusError(backend_unavailable)` when it cannot within `patience_s`.
    """
    if not subject.startswith(subjects.EVENT_PREFIX):  # not kept in LLM_OUT: nobody acks it
        await nc.publish(subject, data)
        return
    js = nc.jetstream()
    hdrs = {headers.MSG_ID: msg_id}

    async def publish() -> None:
        await js.publish(subject, data, headers=hdrs, timeout=2)

    try:
        await with_backoff(
            publish,
            backoff=STORE_BACKOFF,
            retryable=lambda exc: isinstance(exc, _TRANSIENT),
            deadline=asyncio.get_running_loop().time() + patience_s,
        )
    except _TRANSIENT as exc:
        raise LlmbusError(ErrorCode.BACKEND_UNAVAILABLE, "cannot store the event in LLM_OUT") from exc
