"""The ledger's tables, as SQLAlchemy Core metadata (the migrations in `migrations/` create them).

Times are Unix seconds (double precision) so SQLite and PostgreSQL compare and group them the same
way; `day` and `hour` are the UTC period of the request's end, stored so grouping is an index scan
on both databases rather than dialect-specific date functions.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

requests = Table(
    "ledger_requests",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("tenant", String(64), nullable=False, default=""),
    Column("key_id", String(16), nullable=False, default=""),
    Column("api", String(16), nullable=False, default=""),
    Column("kind", String(32), nullable=False, default=""),
    Column("requested_model", String(200), nullable=False, default=""),
    Column("model", String(200), nullable=False),
    Column("route", String(64), nullable=False, default=""),
    Column("host", String(255), nullable=False, default=""),
    Column("outcome", String(32), nullable=False),
    Column("cancelled", Boolean, nullable=False, default=False),
    Column("prompt_tokens", BigInteger, nullable=False, default=0),
    Column("completion_tokens", BigInteger, nullable=False, default=0),
    Column("total_tokens", BigInteger, nullable=False, default=0),
    Column("cost", Float, nullable=False, default=0.0),
    Column("queued_ms", Float),
    Column("ttft_ms", Float),
    Column("duration_ms", Float, nullable=False),
    Column("tokens_per_s", Float),
    Column("attempts", Integer, nullable=False, default=1),
    Column("trace_id", String(32), nullable=False, default=""),
    Column("accepted_at", Float),
    Column("ended_at", Float, nullable=False),
    Column("recorded_at", Float, nullable=False),
    Column("day", String(10), nullable=False),
    Column("hour", String(13), nullable=False),
    Index("ix_ledger_requests_ended", "ended_at"),
    Index("ix_ledger_requests_tenant_ended", "tenant", "ended_at"),
    Index("ix_ledger_requests_model_ended", "model", "ended_at"),
)

# Running totals per tenant and period (`d:YYYY-MM-DD`, `m:YYYY-MM`), updated in the transaction
# that inserts the rows, only for rows that were new: a redelivered event never counts twice.
spend = Table(
    "ledger_spend",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("period", String(12), primary_key=True),
    Column("tokens", BigInteger, nullable=False),
    Column("cost", Float, nullable=False),
)

# Prompts and answers (LLMBUS_LEDGER_CONTENT=on), apart from the rows: the retention purge and an
# erasure delete here and leave the usage rows (and the totals) alone unless asked to.
content = Table(
    "ledger_content",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("tenant", String(64), nullable=False, default=""),
    Column("key_id", String(16), nullable=False, default=""),
    Column("ended_at", Float, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("answer", Text, nullable=False),
    Column("truncated", Boolean, nullable=False, default=False),
    # Where its usage event is in LLM_USAGE: an erasure deletes that copy of the prompt too.
    Column("stream_seq", BigInteger),
    Index("ix_ledger_content_ended", "ended_at"),
    Index("ix_ledger_content_tenant_key", "tenant", "key_id"),
)
