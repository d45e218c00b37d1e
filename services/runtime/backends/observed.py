"""Every call to a model server, observed the same way whichever client makes it.

A backend method decorated with `@generation("ollama")` or `@embedding("ollama")` gets one CLIENT
span per call, named `{gen_ai.operation.name} {gen_ai.request.model}` and carrying the GenAI
semantic-convention attributes (`gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.response.model`,
`gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, `gen_ai.response.finish_reasons`,
`error.type`), one `first_token` span event, and the model-call metrics of
`services.runtime.metrics`. Per token it adds one type check and one flag test, nothing else.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, SpanKind, Status, StatusCode

from contracts import GenerateRequest, LlmbusError
from services.runtime import metrics, tracing
from services.runtime.backends.base import EmbedResult, Final, Piece


class _HasUrl(Protocol):
    url: str


B = TypeVar("B", bound=_HasUrl)
GenerateFn = Callable[[B, GenerateRequest], AsyncIterator[Piece]]
EmbedFn = TypeVar("EmbedFn", bound=Callable[..., Awaitable[EmbedResult]])

FIRST_TOKEN = "first_token"  # the span event's name


@functools.lru_cache(maxsize=64)
def _server(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


class ModelCall:
    """One call: its span, its timings, and the metrics recorded when it ends."""

    __slots__ = ("_ended", "error", "labels", "span", "started", "tokens", "ttft")

    def __init__(
        self, provider: str, operation: str, model: str, url: str, request: GenerateRequest | None = None
    ) -> None:
        self.labels = (operation, provider, model)
        self.started = time.perf_counter()
        self.ttft: float | None = None
        self.tokens: tuple[int, int] | None = None
        self.error: str | None = None
        self._ended = False
        address, port = _server(url)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "server.address": address,
            "server.port": port,
        }
        if request is not None:
            options = request.options
            for key, value in (
                ("gen_ai.request.max_tokens", options.num_predict),
                ("gen_ai.request.temperature", options.temperature),
                ("gen_ai.request.top_p", options.top_p),
                ("gen_ai.request.top_k", options.top_k),
                ("gen_ai.request.seed", options.seed),
            ):
                if value is not None:
                    attributes[key] = value
        # Not made current: nothing runs beneath it, and an async generator may be closed from
        # another context than the one it started in. A call outside any request (a start-up
        # warm-up, the classifier embedding its routes) would be a stray root trace: not traced.
        links = tracing.links()
        self.span = (
            tracing.tracer.start_span(
                f"{operation} {model}", kind=SpanKind.CLIENT, attributes=attributes, links=links
            )
            if links or trace.get_current_span().get_span_context().is_valid
            else INVALID_SPAN
        )

    def first_token(self) -> None:
        self.ttft = time.perf_counter() - self.started
        self.span.add_event(FIRST_TOKEN)

    def succeeded(
        self,
        input_tokens: int,
        output_tokens: int | None,
        finish_reason: str | None,
        response_model: str | None = None,
    ) -> None:
        self.tokens = (input_tokens, output_tokens or 0)
        if response_model:
            self.span.set_attribute("gen_ai.response.model", response_model)
        self.span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
        if output_tokens is not None:
            self.span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        if finish_reason is not None:
            self.span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        self.end()

    def failed(self, exc: BaseException) -> None:
        if self._ended:
            return
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            self.error = "cancelled"  # the client went away or the deadline passed: not an upstream fault
        else:
            self.error = str(exc.code) if isinstance(exc, LlmbusError) else type(exc).__qualname__
            message = exc.message if isinstance(exc, LlmbusError) else None
            self.span.set_status(Status(StatusCode.ERROR, message))
        self.span.set_attribute("error.type", self.error)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.span.end()
        tokens = self.tokens if self.error is None else None
        metrics.model_call_ended(
            self.labels, time.perf_counter() - self.started, self.ttft, tokens, self.error
        )


def generation(provider: str) -> Callable[[GenerateFn[B]], GenerateFn[B]]:
    """Decorates a backend's `generate(request)` stream."""

    def decorate(fn: GenerateFn[B]) -> GenerateFn[B]:
        @functools.wraps(fn)
        async def generate(self: B, request: GenerateRequest) -> AsyncIterator[Piece]:
            operation = "chat" if request.is_chat else "text_completion"
            call = ModelCall(provider, operation, request.model, self.url, request)
            pieces = fn(self, request)
            first = True
            try:
                async for piece in pieces:
                    if isinstance(piece, Final):  # the call is complete, whatever the consumer does next
                        call.succeeded(
                            piece.prompt_tokens, piece.completion_tokens, piece.finish_reason, piece.model
                        )
                    elif first:  # text, thinking or a tool call: the model's first output
                        first = False
                        call.first_token()
                    yield piece
            except BaseException as exc:
                call.failed(exc)
                raise
            finally:
                # Closing this stream closes the client's, and so the upstream HTTP response, now.
                aclose = getattr(pieces, "aclose", None)
                if aclose is not None:
                    await aclose()
                call.end()

        return generate

    return decorate


def embedding(provider: str) -> Callable[[EmbedFn], EmbedFn]:
    """Decorates a backend's `embed(model, inputs, ...)` call."""

    def decorate(fn: EmbedFn) -> EmbedFn:
        @functools.wraps(fn)
        async def embed(self: _HasUrl, model: str, *args: Any, **kwargs: Any) -> EmbedResult:
            call = ModelCall(provider, "embeddings", model, self.url)
            try:
                result = await fn(self, model, *args, **kwargs)
            except BaseException as exc:
                call.failed(exc)
                call.end()
                raise
            call.succeeded(result.prompt_tokens, None, None)
            return result

        return cast(EmbedFn, embed)

    return decorate
