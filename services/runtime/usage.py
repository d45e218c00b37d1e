"""The usage event every worker publishes after a request's terminal event.

Core NATS on `llm.evt.usage.<model>` (fire and forget: nobody waits for it). The janitor learns
from it when each model was last used; anything else (billing, dashboards) may subscribe too.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
from nats.aio.client import Client

from contracts import Error, subjects
from contracts.models import UsageEvent

_encode = msgspec.json.Encoder().encode


async def publish(nc: Client, job: Any, event: object) -> None:
    """`job` is a `worker.Job`, `event` its terminal event; never raises."""
    model = getattr(job.request, "model", None)
    if not isinstance(model, str) or not model:
        return
    parts = str(getattr(job.msg, "subject", "")).split(".")
    usage = getattr(event, "usage", None)
    report = UsageEvent(
        model=model,
        kind=parts[2] if len(parts) > 2 else "request",  # llm.req.<kind>.<model>
        request_id=job.id,
        at=time.time(),
        outcome=str(event.code) if isinstance(event, Error) else "done",
        duration_ms=round((time.perf_counter() - job.started) * 1000, 3),
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )
    with contextlib.suppress(Exception):
        await nc.publish(subjects.usage_subject(model), _encode(report))
