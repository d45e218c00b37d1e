"""OpenAI's Batch API objects as llmbus stores them (KV `llm_batches`) and serves them.

`tenant` is ours, never shown: another tenant's file or batch looks exactly like one that does not
exist. Everything else is OpenAI's shape, so the official clients parse it unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FILES_BUCKET = "llm_files"  # Object Store: uploaded batch inputs, and the output and error files
BATCHES_BUCKET = "llm_batches"  # KV: `file.<id>` and `batch.<id>` records
LINES_BUCKET = "llm_batch_lines"  # KV: `<batch id>.<line>`: each finished line's output record
BATCH_STREAM = "LLM_BATCH"  # work queue: one message per batch to run (`llm.batch.run`)
BATCH_SUBJECT = "llm.batch.run"

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
ACTIVE: frozenset[str] = frozenset({"validating", "in_progress", "finalizing", "cancelling"})


class FileObject(msgspec.Struct, kw_only=True):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"
    tenant: str = ""


class RequestCounts(msgspec.Struct, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(msgspec.Struct, kw_only=True):
    data: list[BatchError]
    object: str = "list"


class Batch(msgspec.Struct, kw_only=True):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    status: BatchStatus = "validating"
    object: str = "batch"
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    tenant: str = ""


class InputLine(msgspec.Struct, kw_only=True):
    """One line of an input file: `{"custom_id", "method": "POST", "url", "body"}`."""

    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


class LineResult(msgspec.Struct, kw_only=True):
    """A finished line (KV `llm_batch_lines`): its record for the output file (`ok`) or error file."""

    ok: bool
    record: dict[str, Any]


def public(obj: FileObject | Batch) -> dict[str, Any]:
    """The object as OpenAI shows it: without the tenant."""
    shown: dict[str, Any] = msgspec.to_builtins(obj)
    shown.pop("tenant", None)
    return shown
