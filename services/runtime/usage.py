"""The usage event every worker publishes after a request's terminal event.

On `llm.evt.usage.<model>`, fire and forget (nobody waits for it): the janitor learns from it when
each model was last used, and the `LLM_USAGE` stream (created by the ledger) keeps it for the
ledger, once per request (`Nats-Msg-Id: <id>.usage`). It carries who asked (the edge's
`Llmbus-Origin` header), what answered, and how long the request waited and ran.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

import msgspec
from nats.aio.client import Client

from contracts import headers, subjects
from contracts.models import UsageContent, UsageEvent
from contracts.usage import Origin
from services.runtime.request_ended import RequestEnded

_encode = msgspec.json.Encoder().encode
_decode_origin = msgspec.json.Decoder(Origin).decode
_TOO_BIG = UsageContent(prompt="", answer="", truncated=True)


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


async def publish(nc: Client, ended: RequestEnded) -> None:
    """Publishes the usage event of a request that ended; never raises."""
    if not ended.model:
        return
    asked = origin(ended.headers)
    accepted = asked.accepted_ms / 1000 if asked.accepted_ms else ended.stored_at
    report = UsageEvent(
        model=ended.model,
        kind=ended.kind,
        request_id=ended.request_id,
        at=ended.ended_at,
        outcome=ended.error or "done",
        duration_ms=round(ended.duration_s * 1000, 3),
        prompt_tokens=ended.prompt_tokens,
        completion_tokens=ended.completion_tokens,
        tenant=asked.tenant,
        key_id=asked.key_id,
        api=asked.api,
        requested_model=asked.model or ended.model,
        route=asked.route,
        host=ended.host,
        attempt=ended.attempt,
        queued_ms=round(max(0.0, ended.started_at - accepted) * 1000, 3) if accepted else None,
        ttft_ms=ended.ttft_ms,
        tokens_per_s=ended.tokens_per_s,
        trace_id=_trace_id(ended.headers),
        accepted_at=accepted,
        content=ended.content,  # LLMBUS_LEDGER_CONTENT=on (services/runtime/transcript.py)
    )
    data = _encode(report)
    if report.content is not None and len(data) > nc.max_payload - 1024:
        # Prompt and answer too big for one message (LLMBUS_LEDGER_CONTENT_MAX_BYTES set above
        # NATS's limit): the row matters more, so it goes without them.
        data = _encode(msgspec.structs.replace(report, content=_TOO_BIG))
    with contextlib.suppress(Exception):
        await nc.publish(
            subjects.usage_subject(ended.model), data, headers={headers.MSG_ID: f"{ended.request_id}.usage"}
        )
