"""HTTP request bodies of the native API and their mapping to the wire request."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from contracts import Format, GenerateRequest, Message, Options

Timeout = Annotated[float, msgspec.Meta(gt=0, description="Seconds; bounded by the server maximum")]
# true: SSE; false: one JSON answer; "deferred": 202 at once with the id and an events URL to follow.
Stream = bool | Literal["deferred"]


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    options: Options = msgspec.field(default_factory=Options)
    format: Format | None = None
    stream: Stream = False
    timeout: Timeout | None = None

    def to_request(self, request_id: str) -> GenerateRequest:
        """The wire request: every field but how to answer (`stream`, `timeout`)."""
        fields = msgspec.structs.asdict(self)
        del fields["stream"], fields["timeout"]
        return GenerateRequest(id=request_id, **fields)


class ChatBody(_Body, kw_only=True):
    messages: list[Message]


class GenerateBody(_Body, kw_only=True):
    prompt: str
    system: str | None = None
