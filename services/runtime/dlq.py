"""The dead-letter stream `LLM_DLQ`: requests a worker gave up on, kept with the reason.

A worker dead-letters a message that does not decode or validate (it would fail the same way on
every delivery) and one that exhausted `max_deliver` (every worker that took it stopped before it
ended). The copy keeps the original payload and headers and adds `Llmbus-Dlq-Reason`,
`Llmbus-Dlq-Subject` and `Llmbus-Dlq-Deliveries`. `llmbus dlq list|replay` reads and replays them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import msgspec
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from contracts import headers, subjects

# Headers of the original message that must not be copied: JetStream's own and the de-duplication id
# (a replay needs a fresh one, or JetStream would drop it as a duplicate).
_DROP = frozenset({headers.MSG_ID, "Nats-Expected-Stream", "Nats-Expected-Last-Sequence"})
_REASON_MAX = 1000


@dataclass
class DeadLetter:
    seq: int  # sequence in LLM_DLQ
    time: datetime | None
    service: str
    subject: str  # where the request was published
    reason: str
    deliveries: int
    request_id: str | None
    data: bytes
    headers: dict[str, str]


async def dead_letter(
    nc: Client,
    *,
    service: str,
    subject: str,
    data: bytes,
    original_headers: dict[str, str] | None,
    reason: str,
    deliveries: int,
) -> None:
    """Stores a copy in LLM_DLQ (acknowledged by JetStream, so it is not lost); raises if it cannot."""
    hdrs = {k: v for k, v in (original_headers or {}).items() if k not in _DROP}
    hdrs[headers.DLQ_REASON] = reason[:_REASON_MAX].replace("\r", " ").replace("\n", " ")
    hdrs[headers.DLQ_SUBJECT] = subject
    hdrs[headers.DLQ_DELIVERIES] = str(deliveries)
    await nc.jetstream().publish(subjects.dead_letter_subject(service), data, headers=hdrs, timeout=5)


def request_id_of(data: bytes) -> str | None:
    """The `id` of a JSON request, if it has one (a poison message may not)."""
    try:
        value = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):  # nested too deeply to decode
        return None
    rid = value.get("id") if isinstance(value, dict) else None
    return rid if isinstance(rid, str) else None


async def entries(nc: Client, limit: int = 1000) -> list[DeadLetter]:
    """The oldest `limit` dead letters, oldest first."""
    js = nc.jetstream()
    info = await js.stream_info(subjects.DEAD_LETTER_STREAM)
    out: list[DeadLetter] = []
    seq = info.state.first_seq
    while seq and seq <= info.state.last_seq and len(out) < limit:
        try:
            raw = await js.get_msg(subjects.DEAD_LETTER_STREAM, seq=seq, next=True)
        except NotFoundError:
            break
        assert raw.seq is not None
        out.append(_entry(raw.seq, raw.subject or "", raw.data or b"", raw.headers or {}, raw.time))
        seq = raw.seq + 1
    return out


def _entry(seq: int, subject: str, data: bytes, hdrs: dict[str, str], time: datetime | None) -> DeadLetter:
    deliveries = hdrs.get(headers.DLQ_DELIVERIES, "0")
    return DeadLetter(
        seq=seq,
        time=time,
        service=subject.removeprefix(subjects.DEAD_LETTER_PREFIX),
        subject=hdrs.get(headers.DLQ_SUBJECT, ""),
        reason=hdrs.get(headers.DLQ_REASON, ""),
        deliveries=int(deliveries) if deliveries.isdigit() else 0,
        request_id=request_id_of(data),
        data=data,
        headers={k: v for k, v in hdrs.items() if not k.startswith("Llmbus-Dlq-")},
    )


async def replay(nc: Client, entry: DeadLetter, *, keep: bool = False) -> str | None:
    """Publishes the request again under a new id; returns that id (None for a non-JSON message).

    A new id, because the old one may already have events (an `error`) in LLM_OUT, and a client
    following it must not see a second run. The dead letter is deleted unless `keep`.
    """
    js = nc.jetstream()
    data = entry.data
    new_id: str | None = None
    hdrs = dict(entry.headers)
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        new_id = uuid.uuid4().hex
        value["id"] = new_id
        data = msgspec.json.encode(value)
        hdrs[headers.MSG_ID] = new_id
        hdrs[headers.REPLY] = subjects.event_subject(new_id)
        hdrs.pop(headers.DEADLINE, None)  # the old deadline has most likely passed
    await js.publish(entry.subject, data, headers=hdrs, timeout=5)
    if not keep:
        await js.delete_msg(subjects.DEAD_LETTER_STREAM, entry.seq)
    return new_id
