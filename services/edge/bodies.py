"""HTTP request bodies of the native API and their mapping to the wire request."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from contracts import Format, GenerateRequest, Message, Options
from contracts.tools import MAX_TOP_LOGPROBS, Think, Tool, ToolChoice

Timeout = Annotated[float, msgspec.Meta(gt=0, description="Seconds; bounded by the server maximum")]
# true: SSE; false: one JSON answer; "deferred": 202 at once with the id and an events URL to follow.
Stream = bool | Literal["deferred"]
# The response cache for this request (docs/cache.md); the `Llmbus-Cache` header says the same.
CacheMode = Literal["off", "exact", "semantic", "force"]


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = (
        None  # left out: the server's default (LLMBUS_DEFAULT_MODEL, else the default route's)
    )
    options: Options = msgspec.field(default_factory=Options)
    format: Format | None = None
    stream: Stream = False
    timeout: Timeout | None = None
    think: Think | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    cache: CacheMode | None = None

    def to_request(self, request_id: str) -> GenerateRequest:
        """The wire request: every field but how to answer (`stream`, `timeout`, `cache`)."""
        fields = msgspec.structs.asdict(self)
        del fields["stream"], fields["timeout"], fields["cache"]
        return GenerateRequest(id=request_id, **fields)


class ChatBody(_Body, kw_only=True):
    messages: list[Message]
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None


class GenerateBody(_Body, kw_only=True):
    prompt: str
    system: str | None = None
    images: list[str] | None = None
    suffix: str | None = None
    raw: bool | None = None
