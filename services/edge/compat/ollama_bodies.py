"""The Ollama request bodies (`api/types.go`: chat, generate, embed) and their wire requests.

Every field of Ollama's request types is declared: carried to the bus, or refused (`REFUSED`,
services/edge/compat/fields.py). Fields outside them are ignored, as Ollama's own server does.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

from contracts import EmbedRequest, ErrorCode, Format, GenerateRequest, LlmbusError, Message, Options
from contracts.embed import Dimensions
from contracts.tools import Think, Tool, ToolCall
from services.edge.compat.fields import Refusing, tool_call, unsupported

_IMAGE_GENERATION = "llmbus generates text, not images"
_OPTION_FIELDS = frozenset(Options.__struct_fields__)
_KEEP_ALIVE = "the janitor decides how long a model stays loaded (load it with an empty request)"


class _CallFunction(msgspec.Struct):
    name: str
    arguments: dict[str, Any]  # an object, unlike OpenAI's string
    index: int | None = None  # its place in the answer: the order of `tool_calls` says it


class _Call(msgspec.Struct):
    function: _CallFunction
    id: str | None = None


class OllamaMessage(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[_Call] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    def to_message(self, index: int) -> Message:
        calls = [self._call(call, f"{index}.{i}") for i, call in enumerate(self.tool_calls or ())]
        return Message(
            role=self.role,
            content=self.content,
            images=self.images,
            thinking=self.thinking or None,
            tool_calls=calls or None,
            tool_name=self.tool_name,
            tool_call_id=self.tool_call_id,
        )

    @staticmethod
    def _call(call: _Call, place: str) -> ToolCall:
        # Ollama's history calls may have no id (its `tool_name` links the answer): one is made up.
        return tool_call(call.id or f"call_{place}", call.function.name, call.function.arguments)


def _linked(messages: list[Message]) -> list[Message]:
    """A tool result that names neither its tool nor its call (the `ollama` client drops both; so
    Ollama's templates take results in order) answers the next call of the assistant message before
    it: linked to that call here, so every backend gets the link."""
    pending: list[ToolCall] = []
    for i, message in enumerate(messages):
        if message.tool_calls:
            pending = list(message.tool_calls)
        elif message.role == "tool" and pending:
            call = pending.pop(0)
            if message.tool_name is None and message.tool_call_id is None:
                messages[i] = msgspec.structs.replace(
                    message, tool_call_id=call.id, tool_name=call.function.name
                )
    return messages


class _Common(msgspec.Struct, Refusing, kw_only=True):
    model: str
    stream: bool = True  # Ollama streams unless told not to
    format: Format | Literal[""] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    think: Think | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    truncate: bool | None = None
    shift: bool | None = None

    REFUSED: ClassVar = {
        "keep_alive": _KEEP_ALIVE,
        "truncate": "the backend truncates a prompt longer than the context",
        "shift": "the backend shifts the context when the answer fills it",
    }
    NO_OP: ClassVar = {"truncate": (True,), "shift": (True,)}

    def wire_options(self) -> Options:
        """Ollama's `options`: the sampling ones carried; any other one given a value refused."""
        options = self.options or {}
        for name, value in options.items():
            if name not in _OPTION_FIELDS and value is not None:
                raise unsupported(f"options.{name}", "not a sampling option llmbus carries")
        known = {k: v for k, v in options.items() if k in _OPTION_FIELDS}
        try:
            return msgspec.convert(known, Options)
        except msgspec.ValidationError as exc:
            raise LlmbusError(ErrorCode.BAD_REQUEST, f"invalid options: {exc}") from exc

    def wire_format(self) -> Format | None:
        return self.format or None

    def common(self) -> dict[str, Any]:
        self.refuse()
        return {
            "model": self.model,
            "options": self.wire_options(),
            "format": self.wire_format(),
            "think": self.think,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
        }


class ChatBody(_Common, kw_only=True):
    messages: list[OllamaMessage] = []  # none: Ollama's "load the model" (or unload, `keep_alive: 0`)
    tools: list[Tool] | None = None

    @property
    def empty(self) -> bool:
        return not self.messages

    def to_request(self, request_id: str) -> GenerateRequest:
        messages = _linked([m.to_message(i) for i, m in enumerate(self.messages)])
        return GenerateRequest(id=request_id, messages=messages, tools=self.tools or None, **self.common())


class GenerateBody(_Common, kw_only=True):
    prompt: str = ""  # empty: Ollama's "load the model" (or unload, `keep_alive: 0`)
    system: str | None = None
    suffix: str | None = None
    images: list[str] | None = None
    raw: bool | None = None
    template: str | None = None
    context: list[int] | None = None
    width: int | None = None  # image generation (experimental in Ollama) ...
    height: int | None = None
    steps: int | None = None

    REFUSED: ClassVar = _Common.REFUSED | {
        "template": "the backend applies the model's own template (send `raw: true` and a templated prompt)",
        "context": "the deprecated `context`: send the conversation to /api/chat",
        "width": _IMAGE_GENERATION,
        "height": _IMAGE_GENERATION,
        "steps": _IMAGE_GENERATION,
    }

    @property
    def empty(self) -> bool:
        return not self.prompt

    def to_request(self, request_id: str) -> GenerateRequest:
        return GenerateRequest(
            id=request_id,
            prompt=self.prompt,
            system=self.system,
            suffix=self.suffix,
            images=self.images,
            raw=self.raw,
            **self.common(),
        )


class EmbedBody(msgspec.Struct, Refusing, kw_only=True):
    model: str
    input: str | list[str]
    truncate: bool | None = None
    dimensions: Dimensions | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None

    REFUSED: ClassVar = {"options": "an embedding takes no sampling options", "keep_alive": _KEEP_ALIVE}
    NO_OP: ClassVar = {"options": ({},)}

    def to_request(self, request_id: str) -> EmbedRequest:
        self.refuse()
        return EmbedRequest(
            id=request_id,
            model=self.model,
            input=self.input,
            truncate=self.truncate,
            dimensions=self.dimensions,
        )


class LegacyEmbeddingsBody(msgspec.Struct, Refusing, kw_only=True):
    model: str
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None

    REFUSED: ClassVar = EmbedBody.REFUSED
    NO_OP: ClassVar = EmbedBody.NO_OP

    def to_request(self, request_id: str) -> EmbedRequest:
        self.refuse()
        return EmbedRequest(id=request_id, model=self.model, input=self.prompt)
