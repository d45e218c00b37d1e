"""Ollama's native API: streaming `/api/chat` and `/api/generate` over one pooled client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from contracts import ErrorCode, GenerateRequest, LlmbusError
from services.runtime.backends.base import EmbedResult, Final, http_failures
from services.runtime.backends.observed import embedding, generation
from services.runtime.backends.streaming import StreamError, StreamingClient


class _ChunkMessage(msgspec.Struct):
    content: str = ""


class _Chunk(msgspec.Struct):
    """One NDJSON line of Ollama's streaming answer (fields we do not use are skipped)."""

    message: _ChunkMessage | None = None
    response: str | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    error: str | None = None
    model: str | None = None


class _ErrorBody(msgspec.Struct):
    error: str = ""


class _EmbedAnswer(msgspec.Struct):
    embeddings: list[list[float]]
    prompt_eval_count: int = 0


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_embed = msgspec.json.Decoder(_EmbedAnswer).decode
_decode_error = msgspec.json.Decoder(_ErrorBody).decode
_encode = msgspec.json.Encoder().encode


def request_body(request: GenerateRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": request.model, "stream": True}
    if request.messages is not None:
        body["messages"] = msgspec.to_builtins(request.messages)
    else:
        body["prompt"] = request.prompt
        if request.system is not None:
            body["system"] = request.system
    options = msgspec.to_builtins(request.options)
    if options:
        body["options"] = options
    if request.format is not None:
        body["format"] = request.format
    return body


def error_for_status(status: int, body: bytes, model: str) -> LlmbusError:
    try:
        detail = _decode_error(body).error or body.decode(errors="replace")
    except msgspec.DecodeError:
        detail = body.decode(errors="replace")[:500]
    if status == 404:
        return LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} not found on the backend")
    if status == 400:
        return LlmbusError(ErrorCode.BAD_REQUEST, f"backend rejected the request: {detail}")
    return LlmbusError(ErrorCode.BACKEND_ERROR, f"backend answered {status}: {detail}")


class OllamaBackend:
    def __init__(self, url: str, *, connect_timeout: float = 5.0, max_connections: int = 256) -> None:
        self.url = url.rstrip("/")
        # No read timeout: a model may load or evaluate a long prompt for minutes; the request's
        # deadline bounds every call instead.
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(None, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        # Generations, the hot path, go through a leaner client (see streaming.py for why).
        self._stream = StreamingClient(
            self.url, connect_timeout=connect_timeout, max_connections=max_connections
        )

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._stream.aclose()

    async def version(self) -> str:
        try:
            response = await self._client.get("/api/version", timeout=3.0)
            response.raise_for_status()
            return str(response.json().get("version", "unknown"))
        except (httpx.HTTPError, ValueError) as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, f"Ollama at {self.url} is unreachable: {exc!r}"
            ) from exc

    @embedding("ollama")
    async def embed(
        self, model: str, inputs: list[str], *, truncate: bool | None = None, dimensions: int | None = None
    ) -> EmbedResult:
        body: dict[str, Any] = {"model": model, "input": inputs}
        if truncate is not None:
            body["truncate"] = truncate
        if dimensions is not None:
            body["dimensions"] = dimensions
        with http_failures(self.url, "embedding call"):
            response = await self._client.post(
                "/api/embed", content=_encode(body), headers={"content-type": "application/json"}
            )
            if response.status_code != 200:
                raise error_for_status(response.status_code, response.content, model)
            answer = _decode_embed(response.content)
        if len(answer.embeddings) != len(inputs):
            raise LlmbusError(
                ErrorCode.BACKEND_ERROR,
                f"backend returned {len(answer.embeddings)} embeddings for {len(inputs)} inputs",
            )
        return EmbedResult(vectors=answer.embeddings, prompt_tokens=answer.prompt_eval_count)

    @generation("ollama")
    async def generate(self, request: GenerateRequest) -> AsyncIterator[str | Final]:
        path = "/api/chat" if request.is_chat else "/api/generate"
        try:
            async with self._stream.post(path, _encode(request_body(request))) as response:
                if response.status != 200:
                    raise error_for_status(response.status, await response.read(), request.model)
                lines = _ndjson(response.body())
                async for line in lines:
                    chunk = _decode_chunk(line)
                    if chunk.error is not None:
                        raise LlmbusError(ErrorCode.BACKEND_ERROR, f"backend error: {chunk.error}")
                    text = chunk.message.content if chunk.message is not None else chunk.response
                    if text:
                        yield text
                    if chunk.done:
                        async for _ in lines:  # read to the end, so the pool keeps the connection
                            pass
                        speed = (
                            chunk.eval_count / (chunk.eval_duration / 1e9) if chunk.eval_duration else None
                        )
                        yield Final(
                            finish_reason=chunk.done_reason or "stop",
                            prompt_tokens=chunk.prompt_eval_count,
                            completion_tokens=chunk.eval_count,
                            tokens_per_s=speed,
                            model=chunk.model,
                        )
                        return
                raise LlmbusError(ErrorCode.BACKEND_ERROR, "backend closed the stream before it was done")
        except StreamError as exc:
            if exc.connect:
                raise LlmbusError(
                    ErrorCode.BACKEND_UNAVAILABLE, f"cannot reach the model backend at {self.url}"
                ) from exc
            raise LlmbusError(ErrorCode.BACKEND_ERROR, f"backend stream failed: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise LlmbusError(ErrorCode.BACKEND_ERROR, f"backend stream failed: {exc!r}") from exc


async def _ndjson(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Splits a byte stream into lines without decoding to str (msgspec parses bytes directly)."""
    rest = b""
    async for chunk in chunks:
        *lines, rest = (rest + chunk if rest else chunk).split(b"\n")
        for line in lines:
            if line:
                yield line
    if rest.strip():
        yield rest
