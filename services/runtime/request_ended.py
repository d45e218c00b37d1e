"""`RequestEnded`: how one delivery of one request ended, built once from its terminal event.

The worker's metrics, the usage event (the janitor's last use, the ledger's row) and the
`request ended` log line all read this one record, instead of each rebuilding a view of the job.
"""

from __future__ import annotations

import msgspec

from contracts import subjects
from contracts.models import UsageContent


class RequestEnded(msgspec.Struct, frozen=True):
    request_id: str
    subject: str  # the request's subject, `llm.req.<kind>.<model>`
    model: str  # the model the request names ("" when it names none)
    error: str | None  # the terminal `error` event's code; None when it ended well
    attempt: int  # JetStream's delivery count
    host: str  # the model server this worker calls (`host[:port]`)
    started_at: float  # this attempt's start, Unix seconds
    ended_at: float  # Unix seconds
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None  # time to first token, from the worker's start (a `done`'s timings)
    tokens_per_s: float | None = None
    headers: dict[str, str] = {}  # the request's (origin, trace context)
    stored_at: float | None = None  # when JetStream stored the request, Unix seconds
    content: UsageContent | None = None  # prompt and answer, for the ledger (a `RecordingJob`'s)

    @property
    def code(self) -> str:
        """The outcome as metrics and logs name it: `ok` or the error code."""
        return self.error or "ok"

    @property
    def family(self) -> str:
        """The subject without its model token: `llm.req.generate`."""
        return subjects.request_family(self.subject)

    @property
    def kind(self) -> str:
        """`generate`, `embed`, `route`, ... (`request` for a subject of another shape)."""
        parts = self.subject.split(".")
        if parts[2:3] == ["batch"]:  # the batch lane: llm.req.batch.<kind>.<model>
            parts.pop(2)
        return parts[2] if len(parts) > 2 else "request"

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at
