"""The one set of error codes, shared by the bus and HTTP.

A code is stable API: clients switch on it. The HTTP status is derived from it, never chosen ad hoc.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    PROMPT_TOO_LARGE = "prompt_too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    REQUEST_TOO_LARGE = "request_too_large"
    IMAGE_TOO_LARGE = "image_too_large"  # one image over LLMBUS_MAX_IMAGE_BYTES (the message names it)
    RATE_LIMITED = "rate_limited"
    BUDGET_EXCEEDED = "budget_exceeded"  # the tenant spent its tokens (or money) for the day or month
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    BACKEND_ERROR = "backend_error"
    INVALID_OUTPUT = "invalid_output"  # a task's answer did not match its output schema, even retried
    QUEUE_FULL = "queue_full"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BUS_UNAVAILABLE = "bus_unavailable"  # the edge is not (yet, or no longer) connected to NATS
    DEADLINE_EXCEEDED = "deadline_exceeded"
    LEDGER_UNAVAILABLE = "ledger_unavailable"  # usage, stats and history need the ledger service
    # A field the backend or model cannot honour (an image for a text-only model, tools for a model
    # without tool support): refused, never silently dropped. The message names the field.
    UNSUPPORTED = "unsupported"
    # A route of a seed's API that llmbus has no counterpart for (yet): the message names the feature.
    NOT_IMPLEMENTED = "not_implemented"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (the worker naks instead of failing)."""
        return self in _RETRYABLE


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.PROMPT_TOO_LARGE: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.REQUEST_TOO_LARGE: 413,
    ErrorCode.IMAGE_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.BUDGET_EXCEEDED: 429,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
    ErrorCode.BACKEND_ERROR: 502,
    ErrorCode.INVALID_OUTPUT: 502,
    ErrorCode.QUEUE_FULL: 503,
    ErrorCode.BACKEND_UNAVAILABLE: 503,
    ErrorCode.BUS_UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.LEDGER_UNAVAILABLE: 503,
    ErrorCode.UNSUPPORTED: 400,
    ErrorCode.NOT_IMPLEMENTED: 501,
}

_RETRYABLE = frozenset({ErrorCode.BACKEND_UNAVAILABLE})


class LlmbusError(Exception):
    """An error with a stable code; the only exception type that crosses a service boundary."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"LlmbusError({self.code.value!r}, {self.message!r})"
