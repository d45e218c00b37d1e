"""The one load generator every contender gets: streaming httpx clients that time each token.

A request counts as an error unless it answers 200, relays exactly the expected number of tokens
and ends with its protocol's terminal message, so a contender cannot look fast by dropping work.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

# ---------------------------------------------------------------------------- stream parsers


class Parser:
    """Splits a streamed body into its units (lines, SSE frames) and counts tokens as they complete.

    Each protocol says what one unit means in `_take`; buffering and counting are done here once.
    """

    separator = b"\n"

    def __init__(self) -> None:
        self.tokens = 0
        self.finished = False
        self.failure: str | None = None
        self._rest = b""

    def feed(self, chunk: bytes) -> int:
        """Consumes raw body bytes; returns how many tokens they completed."""
        *units, self._rest = (self._rest + chunk.replace(b"\r\n", b"\n")).split(self.separator)
        before = self.tokens
        for unit in units:
            if unit:
                self._take(unit)
        return self.tokens - before

    def _take(self, unit: bytes) -> None:
        raise NotImplementedError


class _OllamaMessage(msgspec.Struct):
    content: str = ""


class _OllamaChunk(msgspec.Struct):
    message: _OllamaMessage | None = None
    done: bool = False
    error: str | None = None


_decode_ollama = msgspec.json.Decoder(_OllamaChunk).decode


class NdjsonParser(Parser):
    """Ollama's native stream: one JSON object a line, the last one `"done": true`."""

    def _take(self, unit: bytes) -> None:
        obj = _decode_ollama(unit)
        if obj.error is not None:
            self.failure = obj.error
        elif obj.done:
            self.finished = True
        elif obj.message is not None and obj.message.content:
            self.tokens += 1


class LlmbusSseParser(Parser):
    """llmbus's SSE: `event: token` per token, then exactly one `event: done` or `event: error`."""

    separator = b"\n\n"

    def _take(self, unit: bytes) -> None:
        kind = _field(unit, b"event: ")
        if kind == b"token":
            self.tokens += 1
        elif kind == b"done":
            self.finished = True
        elif kind == b"error":
            self.failure = _field(unit, b"data: ").decode(errors="replace")


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _OpenAIChunk(msgspec.Struct):
    choices: list[_Choice] = []
    error: Any = None


_decode_openai = msgspec.json.Decoder(_OpenAIChunk).decode


class OpenAISseParser(Parser):
    """OpenAI-style SSE (LiteLLM): `data: {chunk}` frames with `delta.content`, then `data: [DONE]`."""

    separator = b"\n\n"

    def _take(self, unit: bytes) -> None:
        data = _field(unit, b"data: ") or _field(unit, b"data:")
        if not data:
            return
        if data.strip() == b"[DONE]":
            self.finished = True
            return
        obj = _decode_openai(data)
        if obj.error is not None:
            self.failure = str(obj.error)
        for choice in obj.choices:
            if choice.delta is not None and choice.delta.content:
                self.tokens += 1


def _field(frame: bytes, name: bytes) -> bytes:
    for line in frame.split(b"\n"):
        if line.startswith(name):
            return line[len(name) :].strip()
    return b""


# ---------------------------------------------------------------------------- one contender's requests


@dataclass(frozen=True)
class Target:
    """How to ask one contender for one streamed chat answer."""

    name: str
    url: str
    body: dict[str, Any]
    parser: Callable[[], Parser]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class LevelResult:
    """Every request of one contender at one concurrency."""

    concurrency: int
    requests: int = 0
    wall_s: float = 0.0
    tokens: int = 0
    ttft: array[float] = field(default_factory=lambda: array("d"))  # seconds, successful requests
    total: array[float] = field(default_factory=lambda: array("d"))
    gaps: array[float] = field(default_factory=lambda: array("d"))  # between consecutive tokens
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


async def _one(client: httpx.AsyncClient, target: Target, expect: int, result: LevelResult) -> None:
    parser = target.parser()
    started = time.perf_counter()
    first = last = 0.0
    gaps = result.gaps
    try:
        async with client.stream("POST", target.url, json=target.body, headers=target.headers) as response:
            if response.status_code != 200:
                body = await response.aread()
                result.error(f"HTTP {response.status_code}: {body[:200]!r}")
                return
            async for chunk in response.aiter_raw():
                n = parser.feed(chunk)
                if n:
                    now = time.perf_counter()
                    if first == 0.0:
                        first = now
                    else:
                        gaps.append(now - last)
                    # Tokens that arrived in one read arrived together: zero gaps between them.
                    for _ in range(n - 1):
                        gaps.append(0.0)
                    last = now
    except (httpx.HTTPError, msgspec.DecodeError, OSError) as exc:
        result.error(f"{type(exc).__name__}: {exc}")
        return
    end = time.perf_counter()
    if parser.failure is not None:
        result.error(f"stream error: {parser.failure[:200]}")
    elif not parser.finished:
        result.error(f"stream ended without its terminal message after {parser.tokens} tokens")
    elif parser.tokens != expect:
        result.error(f"relayed {parser.tokens} tokens, expected {expect}")
    else:
        result.tokens += parser.tokens
        result.ttft.append(first - started)
        result.total.append(end - started)


async def run_level(
    target: Target,
    *,
    concurrency: int,
    requests: int,
    expect_tokens: int,
    stagger: float = 0.0,
    request_timeout: float = 120.0,
) -> LevelResult:
    """`requests` streamed requests, `concurrency` of them in flight at any time.

    Client `i` starts `i / concurrency * stagger` seconds late, so with `stagger` about one
    request's duration the load is steady (arrivals spread out) rather than a burst of
    `concurrency` simultaneous requests every round.
    """
    result = LevelResult(concurrency=concurrency, requests=requests)
    remaining = requests
    # One client (one keep-alive connection) per simulated user: httpcore's pool scans every
    # connection on each request, which made one shared pool the bottleneck at 256 streams.
    clients = [client_for(1, request_timeout) for _ in range(concurrency)]

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        nonlocal remaining
        if stagger:
            await asyncio.sleep(index / concurrency * stagger)
        while remaining > 0:
            remaining -= 1
            try:
                async with asyncio.timeout(request_timeout):
                    await _one(client, target, expect_tokens, result)
            except TimeoutError:
                result.error(f"no complete answer within {request_timeout}s")

    try:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i, client in enumerate(clients)))
        result.wall_s = time.perf_counter() - started
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    return result


_SSL = ssl.create_default_context()  # loopback HTTP only, but httpx builds one per client otherwise


def client_for(connections: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout), verify=_SSL)


# ---------------------------------------------------------------------------- statistics


def percentile(values: array[float] | list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
