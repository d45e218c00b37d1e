"""The llmbus wire contract: subjects, message types, header names and error codes."""

from contracts import headers, subjects
from contracts.errors import ErrorCode, LlmbusError
from contracts.messages import (
    TERMINAL_TYPES,
    Completion,
    Done,
    Error,
    ErrorBody,
    ErrorDetail,
    Event,
    EventHead,
    Format,
    GenerateRequest,
    Message,
    Options,
    Start,
    Timings,
    Token,
    Usage,
    validate_model,
)

__all__ = [
    "TERMINAL_TYPES",
    "Completion",
    "Done",
    "Error",
    "ErrorBody",
    "ErrorCode",
    "ErrorDetail",
    "Event",
    "EventHead",
    "Format",
    "GenerateRequest",
    "LlmbusError",
    "Message",
    "Options",
    "Start",
    "Timings",
    "Token",
    "Usage",
    "headers",
    "subjects",
    "validate_model",
]
