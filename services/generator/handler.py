"""Turns one generation request into start, token... and done events.

Before the first token, a model server that refuses the connection, answers 5xx or sends nothing
within `backend_first_token_timeout_s` is retried with backoff (nothing has reached the client
yet); after it, a failure ends the request with `backend_error`.

A job that takes over after a crash (`job.prior_text`) continues the answer: a chat gets the text
so far as a trailing assistant message, which the model continues. A `prompt` request cannot be
continued without the model's own prompt template, so it starts over after a `restart` event.
What the earlier attempt delivered besides text is never sent twice: the new attempt's tool calls
that repeat the delivered ones (same name and arguments, in order) and its thinking while it
repeats the delivered thinking are held back (`_Calls`, `_Repeat`).

Besides text the backend streams thinking (`thinking` events), logprobs (on `token` events) and
complete tool calls (`tool_call` events, each once and whole); an answer with calls ends with
`finish_reason: "tool_calls"` (Ollama itself says `stop`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator

import msgspec

from contracts import (
    ErrorCode,
    GenerateRequest,
    LlmbusError,
    Message,
    Thinking,
    Timings,
    Token,
    ToolCall,
    ToolCallEvent,
    Usage,
)
from services.runtime.backends import Backend, Final, Piece, Scored, Thought
from services.runtime.retry import Backoff, with_backoff
from services.runtime.settings import Settings
from services.runtime.worker_job import Job

Stream = AsyncIterator[Piece]

_RETRYABLE = frozenset({ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.BACKEND_ERROR})


def before_first_token(exc: Exception) -> bool:
    """Worth retrying while nothing was streamed: unreachable, 5xx, broken off, or silent."""
    return isinstance(exc, LlmbusError) and exc.code in _RETRYABLE


def continuation(request: GenerateRequest, prior_text: str, prior_tokens: int) -> GenerateRequest | None:
    """The request that makes the model continue after `prior_text`; None if it cannot be built."""
    if request.messages is None:
        return None
    options = request.options
    if options.num_predict is not None and options.num_predict > 0:
        # The limit is the client's, for the whole answer: only what is left of it.
        options = msgspec.structs.replace(options, num_predict=max(options.num_predict - prior_tokens, 1))
    prefix = Message(role="assistant", content=prior_text)
    return msgspec.structs.replace(request, messages=[*request.messages, prefix], options=options)


class Generate:
    @classmethod
    def from_settings(cls, backend: Backend, settings: Settings) -> Generate:
        return cls(
            backend,
            backoff=Backoff.from_settings(settings),
            first_token_timeout_s=settings.backend_first_token_timeout_s,
        )

    def __init__(
        self, backend: Backend, *, backoff: Backoff | None = None, first_token_timeout_s: float = 300.0
    ) -> None:
        self.backend = backend
        self.backoff = backoff or Backoff()
        self.first_token_timeout_s = first_token_timeout_s

    async def __call__(self, job: Job[GenerateRequest]) -> None:
        request = job.request
        await job.start(request.model)
        if job.prior_text:
            continued = continuation(request, job.prior_text, job.prior_tokens)
            if continued is None:
                await job.restart("the model server cannot continue a prompt request; it starts over")
            else:
                request = continued
        stream, piece = await with_backoff(
            lambda: self._open(request),
            backoff=self.backoff,
            retryable=before_first_token,
            deadline=job.deadline,
        )
        first_token_at: float | None = None
        calls = _Calls(request.id, job.prior_calls)
        thinking = _Repeat(job.prior_thinking)
        try:
            while not isinstance(piece, Final):
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if type(piece) is str:  # the hot path
                    await job.token(piece)
                elif isinstance(piece, Scored):
                    await job.emit(
                        Token(seq=job.seq, attempt=job.attempt, text=piece.text, logprobs=piece.logprobs)
                    )
                elif isinstance(piece, Thought):
                    if text := thinking.new(piece.text):
                        await job.emit(Thinking(seq=job.seq, attempt=job.attempt, text=text))
                elif isinstance(piece, ToolCall) and (event := calls.new(piece, job.seq, job.attempt)):
                    await job.emit(event)
                piece = await anext(stream)
        except LlmbusError as exc:
            if exc.code is ErrorCode.BACKEND_UNAVAILABLE:  # after the first token it is a broken stream
                raise LlmbusError(ErrorCode.BACKEND_ERROR, exc.message) from exc
            raise
        finally:
            await _close(stream)
        final = piece
        now = time.perf_counter()
        completion = final.completion_tokens + job.prior_tokens
        await job.done(
            "tool_calls" if calls.count and final.finish_reason == "stop" else final.finish_reason,
            Usage(
                prompt_tokens=final.prompt_tokens,
                completion_tokens=completion,
                total_tokens=final.prompt_tokens + completion,
            ),
            Timings(
                total_ms=round((now - job.started) * 1000, 3),
                ttft_ms=None if first_token_at is None else round((first_token_at - job.started) * 1000, 3),
                tokens_per_s=None if final.tokens_per_s is None else round(final.tokens_per_s, 2),
            ),
        )

    async def _open(self, request: GenerateRequest) -> tuple[Stream, Piece]:
        """Starts a generation and waits for its first piece (a bounded wait)."""
        stream = self.backend.generate(request)
        try:
            async with asyncio.timeout(self.first_token_timeout_s):
                return stream, await anext(stream)
        except TimeoutError as exc:
            await _close(stream)
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"the model server sent nothing within {self.first_token_timeout_s:g}s",
            ) from exc
        except BaseException:
            await _close(stream)
            raise


class _Calls:
    """Numbers an answer's tool calls and names the unnamed; after a crash, holds back the calls
    an earlier attempt delivered. If the new attempt calls differently, none of its calls are sent:
    the client already has a complete set of calls to run, which the answer ends with."""

    def __init__(self, request_id: str, delivered: list[ToolCall]) -> None:
        self._request_id = request_id
        self._delivered = delivered
        self._matched = 0
        self._diverged = False
        self.count = len(delivered)

    def new(self, call: ToolCall, seq: int, attempt: int) -> ToolCallEvent | None:
        if self._diverged:
            return None
        if self._matched < len(self._delivered):
            if call.function != self._delivered[self._matched].function:
                self._diverged = True
                return None
            self._matched += 1
            return None
        index = self.count
        self.count += 1
        if not call.id:
            call = msgspec.structs.replace(call, id=f"call_{self._request_id}_{index}")
        return ToolCallEvent(seq=seq, attempt=attempt, index=index, call=call)


class _Repeat:
    """A new attempt's text held back while it repeats `sent`, which the client already has; the
    rest once it goes past it; nothing more once it differs."""

    def __init__(self, sent: str) -> None:
        self._sent = sent
        self._at = 0
        self._diverged = False

    def new(self, text: str) -> str:
        if self._at >= len(self._sent):
            return "" if self._diverged else text
        n = min(len(text), len(self._sent) - self._at)
        if text[:n] != self._sent[self._at : self._at + n]:
            self._diverged = True
            self._at = len(self._sent)
            return ""
        self._at += n
        return text[n:]


async def _close(stream: Stream) -> None:
    """Closes the upstream response (backends are async generators)."""
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()
