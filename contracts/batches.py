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
# A line's `Llmbus-Origin` api: the ledger records it; the classifier keeps the line on the batch lane.
BATCH_API = "batch"

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")  # OpenAI's Batch API
NATIVE_ENDPOINTS = ("/v1/chat", "/v1/generate", "/v1/embed")  # llmbus's own `POST /v1/batches`
NativeEndpoint = Literal["/v1/chat", "/v1/generate", "/v1/embed"]
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 24 * 3600  # a file's `expires_after` (OpenAI's bounds)
ACTIVE: frozenset[str] = frozenset({"validating", "in_progress", "finalizing", "cancelling"})


class FileObject(msgspec.Struct, kw_only=True):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"
    expires_at: int | None = None  # gone after this (`expires_after`; batch files: 30 days)
    tenant: str = ""


class ExpiresAfter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's `expires_after` of a file (and a batch's `output_expires_after`): seconds after the
    file's creation, one hour to thirty days."""

    anchor: Literal["created_at"]
    seconds: int

    def validate(self) -> None:
        if not MIN_EXPIRY_S <= self.seconds <= MAX_EXPIRY_S:
            raise ValueError(f"`seconds` must be between {MIN_EXPIRY_S} and {MAX_EXPIRY_S}")


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
    output_expires_s: int | None = None  # the output and error files' `expires_after` (not shown)


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
    for hidden in ("tenant", "output_expires_s"):
        shown.pop(hidden, None)
    return shown


# llmbus's own batch API (`POST /v1/batches`, docs/batches.md): the lines inline, each the body of
# the native endpoint it names; progress as SSE (`GET /v1/batches/{id}/events`, or `"stream": true`).


class NativeLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    body: dict[str, Any]  # exactly what `POST <endpoint>` takes (`stream` must be left out)
    custom_id: str | None = None  # default: the line's index ("0", "1", ...)


class NativeBatchBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    endpoint: NativeEndpoint
    lines: list[NativeLine]
    metadata: dict[str, str] | None = None
    stream: bool = False  # true: the answer is the batch's progress as SSE, ending with `done`


class BatchProgress(msgspec.Struct, kw_only=True, tag="progress", tag_field="type"):
    """SSE `progress`: sent when the batch's status or counts change (at most twice a second)."""

    batch_id: str
    status: BatchStatus
    total: int
    completed: int
    failed: int


class BatchDone(msgspec.Struct, kw_only=True, tag="done", tag_field="type"):
    """SSE `done`, the last event: the batch ended (`completed`, `failed`, `expired`, `cancelled`)."""

    batch_id: str
    status: BatchStatus
    total: int
    completed: int
    failed: int
    output_file_id: str | None = None
    error_file_id: str | None = None


BatchEvent = BatchProgress | BatchDone
