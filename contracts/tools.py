"""Tool calling, reasoning and log probabilities on the bus: the parts of a request and of an answer
that are neither plain text nor sampling options.

Shapes follow Ollama's `api/types.go` (arguments are a JSON object, not a string) with OpenAI's
call `id`, so either API's edge dialect maps onto them without loss.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

JsonObject = dict[str, Any]


class ToolFunction(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: JsonObject | None = None  # a JSON Schema of the arguments object


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    """A function the model may call (OpenAI's and Ollama's `tools[]` item)."""

    function: ToolFunction
    type: Literal["function"] = "function"


class NamedTool(msgspec.Struct, forbid_unknown_fields=True):
    """`tool_choice` naming one tool the model must call."""

    name: str


# "auto": the model decides (the default); "none": no call; "required": at least one call.
ToolChoice = Literal["auto", "none", "required"] | NamedTool


class ToolCallFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    arguments: JsonObject  # parsed: a call whose arguments are not a JSON object never reaches the bus


class ToolCall(msgspec.Struct, forbid_unknown_fields=True):
    """One complete call: in an assistant `Message` (history) and in a `tool_call` event."""

    id: str  # answered by a `tool` message's `tool_call_id`
    function: ToolCallFunction
    type: Literal["function"] = "function"


# Ollama's `think`: on/off, or a reasoning effort for models that take one (gpt-oss).
Think = bool | Literal["low", "medium", "high"]


class TokenLogprob(msgspec.Struct, omit_defaults=True):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes (a token may split a character)


class Logprob(msgspec.Struct, omit_defaults=True):
    """A generated token's log probability and, when asked (`top_logprobs`), its likeliest rivals."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TokenLogprob] | None = None


MAX_TOP_LOGPROBS = 20  # OpenAI's bound; Ollama and llama.cpp take as many
