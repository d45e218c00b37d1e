"""The usage event every worker publishes after a request's terminal event.

On `llm.evt.usage.<model>`, fire and forget (nobody waits for it): the janitor learns from it when
each model was last used, and the `LLM_USAGE` stream (created by the ledger) keeps it for the
ledger, once per request (`Nats-Msg-Id: <id>.usage`). It carries who asked (the edge's
`Llmbus-Origin` header), what answered, and how long the request waited and ran.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec
from nats.aio.client import Client

from contracts import Error, headers, subjects
from contracts.models import UsageEvent
from contracts.usage import Origin

_encode = msgspec.json.Encoder().encode
_decode_origin = msgspec.json.Decoder(Origin).decode


def host_of(url: str) -> str:
    """`host[:port]` of a model server's URL: what the ledger records as the host that answered."""
    return urlsplit(url).netloc.rpartition("@")[2] if url else ""


def origin(hdrs: dict[str, str] | None) -> Origin:
    raw = (hdrs or {}).get(headers.ORIGIN)
    if raw:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            return _decode_origin(raw)
    return Origin()


def encode_origin(value: Origin) -> str:
    return _encode(value).decode()


def _trace_id(hdrs: dict[str, str]) -> str:
    parts = hdrs.get(headers.TRACEPARENT, "").split("-")  # version-traceid-spanid-flags
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


async def publish(nc: Client, job: Any, event: object, host: str = "") -> None:
    """`job` is a `worker.Job`, `event` its terminal event; never raises."""
    model = getattr(job.request, "model", None)
    if not isinstance(model, str) or not model:
        return
    msg = job.msg
    parts = str(getattr(msg, "subject", "")).split(".")
    if parts[2:3] == ["batch"]:  # the batch lane: llm.req.batch.<kind>.<model>
        parts.pop(2)
    hdrs = getattr(msg, "headers", None) or {}
    asked = origin(hdrs)
    usage = getattr(event, "usage", None)
    timings = getattr(event, "timings", None)
    now = time.time()
    started = now - (time.perf_counter() - job.started)  # this attempt's start, wall clock
    accepted = asked.accepted_ms / 1000 if asked.accepted_ms else _stored_at(msg)
    report = UsageEvent(
        model=model,
        kind=parts[2] if len(parts) > 2 else "request",  # llm.req.<kind>.<model>
        request_id=job.id,
        at=now,
        outcome=str(event.code) if isinstance(event, Error) else "done",
        duration_ms=round((now - started) * 1000, 3),
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        tenant=asked.tenant,
        key_id=asked.key_id,
        api=asked.api,
        requested_model=asked.model or model,
        route=asked.route,
        host=host,
        attempt=int(getattr(job, "attempt", 1) or 1),
        queued_ms=round(max(0.0, started - accepted) * 1000, 3) if accepted else None,
        ttft_ms=getattr(timings, "ttft_ms", None),
        tokens_per_s=getattr(timings, "tokens_per_s", None),
        trace_id=_trace_id(hdrs),
        accepted_at=accepted,
    )
    with contextlib.suppress(Exception):
        await nc.publish(
            subjects.usage_subject(model), _encode(report), headers={headers.MSG_ID: f"{job.id}.usage"}
        )


def _stored_at(msg: Any) -> float | None:
    """When JetStream stored the request (a direct publisher sends no `Llmbus-Origin`)."""
    with contextlib.suppress(Exception):
        stamp = msg.metadata.timestamp
        return float(stamp.timestamp()) if stamp is not None else None
    return None
