"""Micro-batching: concurrent embed requests for the same model become one backend call.

A backend call costs far more than one more input in it (HTTP, scheduling, setting up one forward
pass for the whole batch), so the inputs of requests for the same (model, truncate, dimensions) go
out together: a batch leaves when it holds `max_batch` inputs or its oldest input has waited
`max_wait`, and at most `max_calls` calls per model are in flight. While they run, new requests
queue, so under load batches fill up on their own instead of many small calls queueing at the
backend (Ollama runs one embedding call at a time). A request with more than `max_batch` inputs is
split into pieces of that size. Each requester gets back its own slice, in order.

One bad input (a text over the context length with `truncate: false`) makes the backend refuse the
whole call. Such a call is retried in halves until the failing requester is alone, so only it gets
the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext

from contracts import ErrorCode, LlmbusError
from services.embedder import matryoshka
from services.runtime import tracing
from services.runtime.backends import Backend

# Codes a single input can cause; others (unavailable, model not found) fail everyone alike.
_MAYBE_ONE_INPUT = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.BACKEND_ERROR})


class Key(NamedTuple):
    """Requests merge only when the backend call would be the same."""

    model: str
    truncate: bool | None
    dimensions: int | None


class Part(NamedTuple):
    """What a requester gets back: float32 vectors in its input order, and their cost."""

    vectors: list[array[float]]
    prompt_tokens: int  # the call's count, split between its requesters by characters
    backend_ms: float  # summed over the calls that carried these inputs


@dataclass(slots=True)
class _Piece:
    texts: list[str]
    chars: int
    future: asyncio.Future[Part]
    since: float  # event-loop time it was queued
    caller: SpanContext = INVALID_SPAN_CONTEXT  # the requester's span: the shared call links to it


@dataclass(slots=True)
class _Lane:
    """The queue and the calls in flight of one key."""

    waiting: deque[_Piece] = field(default_factory=deque)
    size: int = 0  # inputs waiting
    in_flight: int = 0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    def __init__(
        self, backend: Backend, *, max_batch: int, max_wait_s: float, max_calls: int = 1, merge: bool = True
    ) -> None:
        self.backend = backend
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_calls = max(1, max_calls)
        self.merge = merge  # False: one backend call per request at once (still split at max_batch)
        self._lanes: dict[Key, _Lane] = {}
        self._calls: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Inputs queued for a call, over every model."""
        return sum(lane.size for lane in self._lanes.values())

    async def embed(self, key: Key, texts: list[str]) -> Part:
        """The vectors of `texts`, in order. Cancelling the caller never cancels a shared call."""
        step = self.max_batch
        futures = [self._add(key, texts[i : i + step]) for i in range(0, len(texts), step)]
        try:
            parts = await asyncio.gather(*futures)
        except BaseException:
            for future in futures:
                if not future.cancel() and not future.cancelled():
                    future.exception()  # retrieved: a second failed piece is not "never retrieved"
            raise
        if len(parts) == 1:
            return parts[0]
        return Part(
            [vector for part in parts for vector in part.vectors],
            sum(part.prompt_tokens for part in parts),
            sum(part.backend_ms for part in parts),
        )

    async def aclose(self) -> None:
        """Stops timers and calls in flight; their requesters are cancelled."""
        for lane in self._lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
            for piece in lane.waiting:
                piece.future.cancel()
        self._lanes.clear()
        for task in list(self._calls):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._calls, return_exceptions=True)

    def _add(self, key: Key, texts: list[str]) -> asyncio.Future[Part]:
        loop = asyncio.get_running_loop()
        caller = tracing.current_context()
        piece = _Piece(texts, sum(map(len, texts)), loop.create_future(), loop.time(), caller)
        if not self.merge:
            self._launch(key, [piece], None)
            return piece.future
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.waiting.append(piece)
        lane.size += len(texts)
        self._pump(key, lane)
        return piece.future

    def _pump(self, key: Key, lane: _Lane) -> None:
        """Sends every batch that is due while a call slot is free; otherwise arms the timer."""
        loop = asyncio.get_running_loop()
        while lane.waiting and lane.in_flight < self.max_calls:
            due = lane.waiting[0].since + self.max_wait_s
            if lane.size < self.max_batch and loop.time() < due:
                if lane.timer is None:
                    lane.timer = loop.call_at(due, self._on_timer, key)
                return
            batch: list[_Piece] = []
            inputs = 0
            while lane.waiting and (not batch or inputs + len(lane.waiting[0].texts) <= self.max_batch):
                piece = lane.waiting.popleft()
                lane.size -= len(piece.texts)
                if not piece.future.done():  # its requester left meanwhile
                    batch.append(piece)
                    inputs += len(piece.texts)
            if batch:
                lane.in_flight += 1
                self._launch(key, batch, lane)
        if not lane.waiting and not lane.in_flight and self._lanes.get(key) is lane:
            if lane.timer is not None:
                lane.timer.cancel()
            del self._lanes[key]

    def _on_timer(self, key: Key) -> None:
        lane = self._lanes.get(key)
        if lane is not None:
            lane.timer = None
            self._pump(key, lane)

    def _launch(self, key: Key, pieces: list[_Piece], lane: _Lane | None) -> None:
        task = asyncio.create_task(self._call(key, pieces))
        self._calls.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._calls.discard(task)
            if lane is not None:
                lane.in_flight -= 1
                if self._lanes.get(key) is lane:
                    self._pump(key, lane)

        task.add_done_callback(done)

    async def _call(self, key: Key, pieces: list[_Piece]) -> None:
        pieces = [piece for piece in pieces if not piece.future.done()]  # requesters that left
        if not pieces:
            return
        texts = [text for piece in pieces for text in piece.texts]
        started = time.perf_counter()
        try:
            with tracing.linked(piece.caller for piece in pieces):
                result = await self.backend.embed(
                    key.model, texts, truncate=key.truncate, dimensions=key.dimensions
                )
        except LlmbusError as exc:
            if len(pieces) > 1 and exc.code in _MAYBE_ONE_INPUT:
                half = len(pieces) // 2  # one half at a time, as the backend runs them anyway
                await self._call(key, pieces[:half])
                await self._call(key, pieces[half:])
            else:
                _fail(pieces, exc)
            return
        except asyncio.CancelledError:
            for piece in pieces:
                piece.future.cancel()
            raise
        except Exception as exc:  # a bug: the worker turns it into `internal` for each requester
            _fail(pieces, exc)
            return
        backend_ms = (time.perf_counter() - started) * 1000
        vectors = [array("f", vector) for vector in result.vectors]
        if key.dimensions is not None:  # a server without the parameter answers its full size
            try:
                vectors = matryoshka.fit(key.model, vectors, key.dimensions)
            except LlmbusError as exc:
                _fail(pieces, exc)
                return
        total_chars = sum(piece.chars for piece in pieces) or 1
        offset = chars = tokens = 0
        for piece in pieces:
            count = len(piece.texts)
            chars += piece.chars
            # Cumulative rounding: the shares add up to exactly the call's count.
            upto = round(result.prompt_tokens * chars / total_chars)
            if not piece.future.done():
                piece.future.set_result(Part(vectors[offset : offset + count], upto - tokens, backend_ms))
            offset += count
            tokens = upto


def _fail(pieces: list[_Piece], exc: Exception) -> None:
    for piece in pieces:
        if not piece.future.done():
            piece.future.set_exception(exc)
