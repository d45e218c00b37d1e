"""What every contract module shares: the typed rules for ids and model names, and the event base.

The rules live in the types (`Annotated[str, msgspec.Meta(pattern=...)]`), so decoding enforces
them and the exported JSON Schema carries them for publishers in other languages; `check_id` and
`validate_model` apply the same patterns to a struct built in code (msgspec checks constraints
only when it decodes). Cross-field rules are each struct's `__post_init__`, which runs both when
a message is decoded and when it is built.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from contracts.errors import ErrorCode, LlmbusError
from contracts.subjects import MODEL_NAME, MODEL_NAME_PATTERN, REQUEST_ID, REQUEST_ID_PATTERN, REQUEST_ID_RULE

RequestId = Annotated[
    str,
    msgspec.Meta(
        pattern=REQUEST_ID_PATTERN, description=f"The request's id: {REQUEST_ID_RULE} (a subject token)"
    ),
]
ModelName = Annotated[
    str,
    msgspec.Meta(
        pattern=MODEL_NAME_PATTERN, description="A model name as Ollama takes it: `namespace/name:tag`"
    ),
]


def check_id(value: str, what: str = "id") -> str:
    """`value` if it is a valid request id, else `bad_request` naming `what`."""
    if not REQUEST_ID.match(value):
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"{what} must be {REQUEST_ID_RULE}")
    return value


def validate_model(model: str) -> None:
    if not MODEL_NAME.match(model):
        raise LlmbusError(ErrorCode.BAD_REQUEST, f"invalid model name {model[:64]!r}")


def bad_request(message: str) -> LlmbusError:
    return LlmbusError(ErrorCode.BAD_REQUEST, message)


class EventBase(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Every event: its place in the request's sequence (`seq`, the SSE `id:`) and the attempt
    that produced it. Subclasses set their `tag` (the event's `type`)."""

    seq: int
    attempt: int
