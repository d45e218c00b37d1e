"""The ledger's read API on the bus (`llm.ledger.<verb>`, micro service `llmbus-ledger`) and the
running totals it keeps for budgets (KV `llm_spend`, one key per tenant).

The edge serves these over HTTP (`/v1/usage`, `/v1/stats`, `/v1/history`), scoping every query to
the caller's tenant unless the caller is an admin; `llmbus usage` and `llmbus stats` ask directly.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from contracts.models import UsageContent

LEDGER_VERBS = ("usage", "stats", "history", "record", "erase", "forget")
GroupBy = Literal["tenant", "model", "day", "hour"]


class UsageQuery(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    group_by: list[GroupBy] = msgspec.field(default_factory=lambda: ["tenant", "model", "day"])
    since: float | None = None  # Unix seconds (request end), inclusive
    until: float | None = None  # exclusive
    tenant: str | None = None  # only this tenant's requests (the edge sets it for non-admins)


class UsageRow(msgspec.Struct, omit_defaults=True, kw_only=True):
    tenant: str | None = None
    model: str | None = None
    day: str | None = None  # UTC, `YYYY-MM-DD`
    hour: str | None = None  # UTC, `YYYY-MM-DDTHH`
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float = 0.0  # in the currency of `[costs]` in infra/models.toml


class UsageReport(msgspec.Struct, kw_only=True):
    group_by: list[GroupBy]
    since: float | None
    until: float | None
    rows: list[UsageRow]


class StatsQuery(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    window_s: float = 3600.0  # the last this many seconds
    model: str | None = None
    tenant: str | None = None


class Percentiles(msgspec.Struct, kw_only=True):
    p50: float
    p95: float
    p99: float


class ModelStats(msgspec.Struct, omit_defaults=True, kw_only=True):
    model: str
    requests: int
    errors: dict[str, int]  # error code -> count (`done` is not an error)
    queued_ms: Percentiles | None = None
    ttft_ms: Percentiles | None = None
    duration_ms: Percentiles | None = None
    tokens_per_s: Percentiles | None = None


class StatsReport(msgspec.Struct, kw_only=True):
    since: float
    until: float
    models: list[ModelStats]


class HistoryQuery(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    limit: int = 50
    cursor: str | None = None  # `next` of the previous page
    tenant: str | None = None
    model: str | None = None
    outcome: str | None = None  # `done` or an error code
    since: float | None = None
    until: float | None = None


class RequestRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One request's row: who asked, what answered, how it went, what it cost."""

    request_id: str
    tenant: str
    key_id: str
    api: str
    kind: str
    requested_model: str
    model: str
    route: str
    host: str
    outcome: str  # `done` or the error code
    cancelled: bool
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float
    queued_ms: float | None = None
    ttft_ms: float | None = None
    duration_ms: float
    tokens_per_s: float | None = None
    attempts: int
    trace_id: str
    accepted_at: float | None = None
    ended_at: float
    recorded_at: float
    # Its prompt and answer (`GET /v1/history/{id}` only; LLMBUS_LEDGER_CONTENT=on, within retention).
    content: UsageContent | None = None


class HistoryPage(msgspec.Struct, kw_only=True):
    items: list[RequestRecord]
    next: str | None = None  # pass as `cursor` for the next (older) page


class RecordRef(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    request_id: str
    tenant: str | None = None  # set: only a record of this tenant is found
    content_only: bool = False  # erase: the prompt and answer only, keep the usage row


class Erased(msgspec.Struct, kw_only=True):
    request_id: str
    erased: bool


class ForgetQuery(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Erase every request of a tenant, or of one API key (`key_id`), or of a key in a tenant."""

    tenant: str | None = None
    key_id: str | None = None  # the first 12 hex digits of the key's SHA-256, as rows hold it
    content_only: bool = False  # the prompts and answers only, keep the usage rows


class Forgotten(msgspec.Struct, kw_only=True):
    requests: int  # usage rows deleted
    contents: int  # prompts and answers deleted


class Spend(msgspec.Struct, kw_only=True):
    """A tenant's running totals (KV `llm_spend`, key = tenant), rewritten after each batch."""

    tenant: str
    day: str  # UTC `YYYY-MM-DD`
    day_tokens: int
    day_cost: float
    month: str  # UTC `YYYY-MM`
    month_tokens: int
    month_cost: float
    at: float  # Unix seconds of the batch that last changed them
