"""Every message on the bus, as typed msgspec structs.

Requests come from outside (the edge, or any backend publishing directly), so they forbid unknown
fields and are validated once more by the worker. Events are a tagged union on `type`; every event
carries its `seq` (0 = start, then one per event, which is also the SSE `id:`) and the `attempt`
that produced it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from contracts.base import EventBase, ModelName, RequestId, bad_request, check_id, validate_model
from contracts.embed import Embeddings, Vectors
from contracts.errors import ErrorCode
from contracts.route import Routed
from contracts.tools import MAX_TOP_LOGPROBS, Logprob, NamedTool, Think, Tool, ToolCall, ToolChoice
from contracts.usage import Usage

__all__ = ["validate_model"]  # re-exported: it was defined here

Role = Literal["system", "user", "assistant", "tool"]


class Message(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    role: Role
    content: str = ""
    images: list[str] | None = None  # base64 (no `data:` prefix), for vision models
    thinking: str | None = None  # an assistant's earlier reasoning, sent back as context
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers (OpenAI's link) ...
    tool_name: str | None = None  # ... and/or the tool's name (Ollama's link)


class Options(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Sampling options, passed to the backend as Ollama's `options`."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None  # max tokens to generate; -1 = until the model stops
    num_ctx: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def __post_init__(self) -> None:
        num_predict = self.num_predict
        if num_predict is not None and (num_predict == 0 or num_predict < -1):
            raise bad_request("`options.num_predict` must be positive or -1")


# `format` is Ollama's structured output: "json" or a JSON Schema object.
Format = Literal["json"] | dict[str, Any]


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """A chat (`messages`) or completion (`prompt`) request on `llm.req.generate.<model>`."""

    id: RequestId
    model: ModelName
    messages: list[Message] | None = None
    prompt: str | None = None
    system: str | None = None
    options: Options = msgspec.field(default_factory=Options)
    format: Format | None = None
    # Prompt requests only (Ollama's generate): images for the prompt, fill-in-the-middle, no template.
    images: list[str] | None = None
    suffix: str | None = None
    raw: bool | None = None
    # Chat requests only: tools the model may call.
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    think: Think | None = None  # reasoning on/off or its effort; the text comes as `thinking` events
    logprobs: bool | None = None  # log probabilities on `token` events ...
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # ... with rivals

    def __post_init__(self) -> None:
        """The cross-field rules, on decode and on construction (`bad_request`)."""
        if (self.messages is None) == (self.prompt is None):
            raise bad_request("exactly one of `messages` or `prompt` is required")
        if self.messages is not None:
            if not self.messages:
                raise bad_request("`messages` must not be empty")
            if all(m.role == "system" for m in self.messages):
                raise bad_request("`messages` needs at least one non-system message")
            for index, message in enumerate(self.messages):
                _validate_message(index, message)
            for name in ("images", "suffix", "raw"):
                if getattr(self, name) is not None:
                    raise bad_request(f"`{name}` is for `prompt` requests (chat: per message)")
        else:
            for name in ("tools", "tool_choice", "parallel_tool_calls"):
                if getattr(self, name) is not None:
                    raise bad_request(f"`{name}` needs `messages`, not `prompt`")
        self._validate_tools()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("`top_logprobs` needs `logprobs: true`")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def validate(self) -> None:
        """The typed rules (`RequestId`, `ModelName`) for a request built in code, not decoded."""
        check_id(self.id)
        validate_model(self.model)

    def _validate_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise bad_request("`tools` has two functions with the same name")
        choice = self.tool_choice
        if isinstance(choice, NamedTool) and choice.name not in names:
            raise bad_request(f"`tool_choice` names {choice.name!r}, not in `tools`")
        if choice == "required" and not names:
            raise bad_request("`tool_choice: required` needs `tools`")


def _validate_message(index: int, message: Message) -> None:
    where = f"`messages[{index}]`"
    if message.tool_calls and message.role != "assistant":
        raise bad_request(f"{where}: only an assistant message has `tool_calls`")
    if (message.tool_call_id is not None or message.tool_name is not None) and message.role != "tool":
        raise bad_request(f"{where}: `tool_call_id` and `tool_name` belong to a `tool` message")
    if message.images is not None and any(not image for image in message.images):
        raise bad_request(f"{where}: an image is empty")


class Timings(msgspec.Struct, omit_defaults=True):
    total_ms: float
    ttft_ms: float | None = None  # time to first token, from when the worker started the request
    tokens_per_s: float | None = None  # generation speed reported by the backend


class Start(EventBase, tag="start"):
    request_id: str
    model: str


class Token(EventBase, tag="token"):
    text: str
    logprobs: list[Logprob] | None = None  # the tokens of `text`, when the request asked for `logprobs`


class Thinking(EventBase, tag="thinking"):
    """Reasoning text (a `think` request, or a model that reasons): never part of the answer's text."""

    text: str


class ToolCallEvent(EventBase, tag="tool_call"):
    """One complete tool call, sent once: `index` counts the answer's calls from 0 (OpenAI's
    `delta.tool_calls[].index`). An answer with calls ends with `finish_reason: "tool_calls"`."""

    index: int
    call: ToolCall


_OUTPUT = "A task's answer, parsed and validated against its output schema (POST /v1/tasks/{name} only)."


class Done(EventBase, tag="done"):
    finish_reason: str  # "stop", "length", "tool_calls"
    usage: Usage
    timings: Timings
    output: Annotated[Any, msgspec.Meta(description=_OUTPUT)] = None
    cached: bool | None = None  # replayed from the edge's response cache (docs/cache.md)


class Error(EventBase, tag="error"):
    code: ErrorCode
    message: str
    retry_after: float | None = None


class Restart(EventBase, tag="restart"):
    """The text (and thinking) streamed so far is void: a new attempt could not continue it and
    starts over.

    Sent only when a worker crashed mid-stream and the backend cannot continue from a prefix (a
    `prompt` request); a client discards the text it has and keeps reading.
    """

    reason: str


# `routed` (contracts/route.py) comes between `start` and the first token of a routed request.
# An embed request's events (contracts/embed.py): `vectors`..., then `embeddings` or `error`.
Event = Start | Routed | Token | Thinking | ToolCallEvent | Restart | Vectors | Embeddings | Done | Error
TERMINAL_EVENTS = (Done, Error, Embeddings)
TERMINAL_TYPES = frozenset({"done", "error", "embeddings"})


class EventHead(msgspec.Struct):
    """Just what a relay needs from an event: decoding skips the rest of the payload."""

    type: str
    seq: int


class Accepted(msgspec.Struct, omit_defaults=True):
    """The edge's record that it accepted a request, on `llm.out.<id>.accepted` (kept in `LLM_OUT`).

    It lets `GET /v1/requests/{id}/events` tell a queued request from an unknown one, bounds a
    resumed stream by the request's deadline, and detects an `Idempotency-Key` reused for another
    request (`fingerprint` is a hash of the request without its id).
    """

    request_id: str
    model: str
    deadline_ms: int  # Unix epoch milliseconds
    fingerprint: str = ""
    tenant: str = ""  # who submitted it (edge admission): only that tenant may resume or cancel it


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    code: ErrorCode
    message: str
    request_id: str | None = None
    retry_after: float | None = None


class ErrorBody(msgspec.Struct):
    """The HTTP error body: `{"error": {"code", "message", "request_id", "retry_after"?}}`."""

    error: ErrorDetail


class Completion(msgspec.Struct, omit_defaults=True):
    """The non-streaming HTTP response for a generate or chat request."""

    request_id: str
    model: str
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    routed: Routed | None = None  # how an `auto` or `route:NAME` request was routed
    thinking: str | None = None  # the `thinking` events' text
    tool_calls: list[ToolCall] | None = None
    logprobs: list[Logprob] | None = None  # every `token` event's, in order
    cached: bool | None = None  # replayed from the edge's response cache (docs/cache.md)
