"""HTTP request bodies of the native API and their mapping to the wire request."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from contracts import Format, GenerateRequest, Message, Options

Timeout = Annotated[float, msgspec.Meta(gt=0, description="Seconds; bounded by the server maximum")]
# true: SSE; false: one JSON answer; "deferred": 202 at once with the id and an events URL to follow.
Stream = bool | Literal["deferred"]


class ChatBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    messages: list[Message]
    options: Options = msgspec.field(default_factory=Options)
    format: Format | None = None
    stream: Stream = False
    timeout: Timeout | None = None

    def to_request(self, request_id: str) -> GenerateRequest:
        return GenerateRequest(
            id=request_id, model=self.model, messages=self.messages, options=self.options, format=self.format
        )


class GenerateBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    prompt: str
    system: str | None = None
    options: Options = msgspec.field(default_factory=Options)
    format: Format | None = None
    stream: Stream = False
    timeout: Timeout | None = None

    def to_request(self, request_id: str) -> GenerateRequest:
        return GenerateRequest(
            id=request_id,
            model=self.model,
            prompt=self.prompt,
            system=self.system,
            options=self.options,
            format=self.format,
        )
