"""The OpenAI request bodies (chat completions, completions, embeddings) and their wire requests.

Every field of OpenAI's request schemas is declared: carried to the bus, or refused (`REFUSED`,
services/edge/compat/fields.py). Fields outside the schema are ignored, as OpenAI's SDKs and
wrappers send their own.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

from contracts import EmbedRequest, ErrorCode, GenerateRequest, LlmbusError, Message, Options
from contracts.embed import Dimensions
from contracts.tools import NamedTool, Think, Tool, ToolCall, ToolChoice, ToolFunction
from services.edge.compat.fields import Refusing, bad, data_url_image, parse_arguments, tool_call, unsupported

_UNUSED = "llmbus does not use it"
_NO_AUDIO = "llmbus carries text and images, not audio"
_NO_FILES = "llmbus carries text and images, not files"


class _ImageUrl(msgspec.Struct):
    url: str
    detail: str | None = None  # a hint to OpenAI's own image tiling: the backends size images themselves


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None
    image_url: _ImageUrl | None = None
    input_audio: Any = None
    file: Any = None
    refusal: str | None = None


class _CallFunction(msgspec.Struct):
    name: str
    arguments: str  # a JSON string


class _Call(msgspec.Struct):
    id: str
    function: _CallFunction
    type: str = "function"


class ChatMessage(msgspec.Struct, Refusing):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[_Call] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    refusal: str | None = None
    audio: Any = None
    function_call: Any = None

    REFUSED: ClassVar = {
        "name": "the backends have no per-participant name",
        "audio": _NO_AUDIO,
        "function_call": "the deprecated `function_call`: use `tool_calls`",
        "refusal": "an earlier refusal is not carried back to the model; send it as `content`",
    }

    def to_message(self, index: int) -> Message:
        where = f"messages[{index}]"
        for name, why in self.REFUSED.items():
            if getattr(self, name) is not None:
                raise unsupported(f"{where}.{name}", why)
        text, images = _content(self.content, where)
        calls = [self._call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(self.tool_calls or ())]
        return Message(
            role="system" if self.role == "developer" else self.role,
            content=text,
            images=images or None,
            tool_calls=calls or None,
            tool_call_id=self.tool_call_id,
        )

    @staticmethod
    def _call(call: _Call, where: str) -> ToolCall:
        if call.type != "function":
            raise unsupported(f"{where}.type", "only `function` tool calls are carried")
        arguments = parse_arguments(call.function.arguments, f"{where}.function.arguments")
        return tool_call(call.id, call.function.name, arguments)


def image_urls(messages: list[ChatMessage]) -> list[tuple[str, _ImageUrl]]:
    """The `image_url` parts, each with where it is (the edge checks their size, may fetch them)."""
    found = []
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if part.type == "image_url" and part.image_url is not None:
                found.append((f"messages[{i}].content[{j}].image_url", part.image_url))
    return found


def _content(content: str | list[ContentPart] | None, where: str) -> tuple[str, list[str]]:
    """A message's text and its images' base64, from a string or an array of content parts."""
    if content is None or isinstance(content, str):
        return content or "", []
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type == "image_url":
            if part.image_url is None:
                raise bad(f"{at}.image_url", "is required")
            images.append(data_url_image(part.image_url.url, f"{at}.image_url"))
        elif part.type == "refusal":
            texts.append(part.refusal or "")
        else:
            why = {"input_audio": _NO_AUDIO, "file": _NO_FILES}.get(part.type, "an unknown type")
            raise unsupported(f"{at}.type", f"{part.type!r}: {why}")
    return "".join(texts), images


class _ToolFunction(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _Tool(msgspec.Struct):
    type: str
    function: _ToolFunction | None = None

    def to_tool(self, index: int) -> Tool:
        where = f"tools[{index}]"
        if self.type != "function" or self.function is None:
            raise unsupported(f"{where}.type", f"{self.type!r}: only `function` tools are carried")
        f = self.function
        if f.strict:
            why = "the backends do not constrain arguments to the schema"
            raise unsupported(f"{where}.function.strict", why)
        return Tool(function=ToolFunction(name=f.name, description=f.description, parameters=f.parameters))


class _NamedFunction(msgspec.Struct):
    name: str


class _ToolChoice(msgspec.Struct):
    type: str
    function: _NamedFunction | None = None


def _tool_choice(choice: str | _ToolChoice | None) -> ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad("tool_choice", "must be auto, none, required or a named function")
        return choice  # type: ignore[return-value]
    if choice.type != "function" or choice.function is None:
        raise unsupported("tool_choice", f"{choice.type!r}: only a named `function` is carried")
    return NamedTool(name=choice.function.name)


# OpenAI's `reasoning_effort` as Ollama's `think` (which has no "minimal": the least it has).
_EFFORT: dict[str, Think] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}


class JsonSchemaSpec(msgspec.Struct):
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def format(self) -> Any:
        if self.type == "json_object":
            return "json"
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema is None:
                raise bad("response_format.json_schema.schema", "is required")
            return self.json_schema.schema
        return None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels: none is sent


class _Sampling(msgspec.Struct, Refusing, kw_only=True):
    """Fields both generation endpoints share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    timeout: float | None = None  # llmbus's own: the request's deadline in seconds

    def options(self, max_tokens: int | None) -> Options:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return Options(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            num_predict=max_tokens or self.max_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


_SHARED_REFUSED = {
    "n": "one choice per request (send several requests)",
    "logit_bias": "the backends take no token biases",
    "user": _UNUSED,
}
_SHARED_NO_OP: dict[str, tuple[Any, ...]] = {"n": (1,), "logit_bias": ({},)}


class ChatCompletionBody(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | _ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: Any = None
    modalities: list[str] | None = None
    function_call: Any = None
    functions: Any = None
    metadata: dict[str, str] | None = None
    prediction: Any = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any = None
    prompt_cache_retention: str | None = None
    moderation: Any = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    verbosity: str | None = None
    web_search_options: Any = None

    REFUSED: ClassVar = _SHARED_REFUSED | {
        "audio": _NO_AUDIO,
        "modalities": "llmbus answers text only",
        "function_call": "the deprecated `function_call`: use `tool_choice`",
        "functions": "the deprecated `functions`: use `tools`",
        "metadata": _UNUSED,
        "prediction": "the backends take no predicted output",
        "prompt_cache_key": "the backends cache prompts on their own",
        "prompt_cache_retention": "the backends cache prompts on their own",
        "prompt_cache_options": "the backends cache prompts on their own",
        "moderation": "llmbus does no moderation",
        "safety_identifier": _UNUSED,
        "service_tier": "llmbus has one service tier",
        "store": "llmbus does not store completions for later retrieval",
        "verbosity": "the backends take no verbosity",
        "web_search_options": "llmbus has no web search",
    }
    NO_OP: ClassVar = _SHARED_NO_OP | {
        "modalities": (["text"],),
        "service_tier": ("auto", "default"),
        "store": (False,),
    }

    def to_request(self, request_id: str) -> GenerateRequest:
        self.refuse()
        return GenerateRequest(
            id=request_id,
            model=self.model,
            options=self.options(self.max_completion_tokens),
            format=None if self.response_format is None else self.response_format.format(),
            messages=[m.to_message(i) for i, m in enumerate(self.messages)],
            tools=[tool.to_tool(i) for i, tool in enumerate(self.tools)] if self.tools else None,
            tool_choice=_tool_choice(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls,
            think=None if self.reasoning_effort is None else _EFFORT[self.reasoning_effort],
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
        )


class CompletionBody(_Sampling, kw_only=True):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = None  # the legacy form: how many alternatives per token (0: only its own)
    best_of: int | None = None

    REFUSED: ClassVar = _SHARED_REFUSED | {"best_of": "one completion is generated per request"}
    NO_OP: ClassVar = _SHARED_NO_OP | {"best_of": (1,)}

    def to_request(self, request_id: str) -> GenerateRequest:
        self.refuse()
        if self.echo and self.logprobs is not None:
            raise unsupported("echo", "with `logprobs`: the prompt's log probabilities are not available")
        return GenerateRequest(
            id=request_id,
            model=self.model,
            prompt=self.text,
            suffix=self.suffix,
            options=self.options(None),
            logprobs=None if self.logprobs is None else True,
            top_logprobs=self.logprobs or None,
        )

    @property
    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise unsupported("prompt", "one prompt per request (send several requests)")
        return self.prompt[0]


class EmbeddingsBody(msgspec.Struct, Refusing, kw_only=True):
    model: str
    input: str | list[Any]  # text or texts; token arrays are refused (the model has its own tokenizer)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Dimensions | None = None
    user: str | None = None
    timeout: float | None = None

    REFUSED: ClassVar = {"user": _UNUSED}

    def to_request(self, request_id: str) -> EmbedRequest:
        self.refuse()
        texts = self.input
        if isinstance(texts, list) and not all(isinstance(text, str) for text in texts):
            raise LlmbusError(
                ErrorCode.UNSUPPORTED,
                "`input` is not supported as token arrays: send strings (the model has its own tokenizer)",
            )
        return EmbedRequest(id=request_id, model=self.model, input=texts, dimensions=self.dimensions)
