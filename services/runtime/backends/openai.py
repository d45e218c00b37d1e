"""The OpenAI-compatible API (llama.cpp's `llama-server`, vLLM, LM Studio, Ollama's `/v1`).

Generation streams `/v1/chat/completions` (chat) or `/v1/completions` (prompt) as Server-Sent
Events with `stream_options.include_usage`, parsed incrementally over bytes; `stream=False` asks
for one JSON answer instead (for servers that cannot stream) and yields it as a single piece.
The body and the answer's pieces (tools, reasoning, logprobs, images) are `openai_wire`'s. What
llama.cpp's `/props` says the model cannot do (images, tools) is refused as `unsupported` first.

A single-model llama.cpp server answers any `model` name with the one model it has, so a name the
server does not list in `/v1/models` is refused here as `model_not_found` rather than silently
served by another model.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import PurePath
from typing import Any

import httpx
import msgspec

from contracts import ErrorCode, GenerateRequest, LlmbusError
from services.runtime.backends.base import EmbedResult, Final, Piece, http_failures, unsupported
from services.runtime.backends.observed import embedding, generation
from services.runtime.backends.openai_wire import (
    Assembler,
    Capabilities,
    Chunk,
    ErrorDetail,
    Usage,
    request_body,
)
from services.runtime.backends.transport import JSON, http_client

__all__ = ["OpenAIBackend", "error_for_status", "request_body", "sse_data"]


class _ErrorBody(msgspec.Struct):
    error: ErrorDetail | str | None = None
    detail: str | None = None  # some servers (FastAPI-based) answer {"detail": ...}


class _Model(msgspec.Struct):
    id: str
    aliases: list[str] = []


class _Models(msgspec.Struct):
    data: list[_Model] = []


class _Embedding(msgspec.Struct):
    index: int
    embedding: list[float]


class _Embeddings(msgspec.Struct):
    data: list[_Embedding]
    usage: Usage | None = None


class _Modalities(msgspec.Struct):
    vision: bool | None = None


class _TemplateCaps(msgspec.Struct):
    supports_tools: bool | None = None


class _Props(msgspec.Struct):
    """llama.cpp's `/props` (the parts that say what the served model can do)."""

    modalities: _Modalities | None = None
    chat_template_caps: _TemplateCaps | None = None


_decode_chunk = msgspec.json.Decoder(Chunk).decode
_decode_props = msgspec.json.Decoder(_Props).decode
_decode_error = msgspec.json.Decoder(_ErrorBody).decode
_decode_models = msgspec.json.Decoder(_Models).decode
_decode_embeddings = msgspec.json.Decoder(_Embeddings).decode
_encode = msgspec.json.Encoder().encode
_DONE = b"[DONE]"
_MODELS_REFRESH_S = 1.0  # an unknown name re-reads /v1/models at most this often


def _detail(error: ErrorDetail | str | None) -> tuple[str, str | None]:
    if isinstance(error, ErrorDetail):
        return error.message, error.type
    return error or "", None


def _in_band(error: ErrorDetail | str) -> LlmbusError:
    """An error the server sent inside a 200 answer (mid-stream, say)."""
    return LlmbusError(ErrorCode.BACKEND_ERROR, f"backend error: {_detail(error)[0]}")


def error_for_status(status: int, body: bytes, model: str) -> LlmbusError:
    try:
        parsed = _decode_error(body)
        message, kind = _detail(parsed.error)
        message = message or parsed.detail or body.decode(errors="replace")[:500]
    except msgspec.DecodeError:
        message, kind = body.decode(errors="replace")[:500], None
    if status == 404:
        return LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} not found on the backend: {message}")
    if "image input is not supported" in message:  # llama.cpp without a vision projector: a 500
        return unsupported("images", f"model {model!r} on this server takes no images")
    if kind == "exceed_context_size_error":
        return LlmbusError(ErrorCode.PROMPT_TOO_LARGE, f"backend rejected the request: {message}")
    if status in (400, 422):
        return LlmbusError(ErrorCode.BAD_REQUEST, f"backend rejected the request: {message}")
    if status in (429, 503):  # llama.cpp answers 503 while it loads the model: worth a retry
        return LlmbusError(ErrorCode.BACKEND_UNAVAILABLE, f"backend is busy or loading ({status}): {message}")
    return LlmbusError(ErrorCode.BACKEND_ERROR, f"backend answered {status}: {message}")


class OpenAIBackend:
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        max_connections: int = 256,
        api_key: str = "",
        stream: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.stream = stream
        self._client = http_client(
            self.url,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            headers={"authorization": f"Bearer {api_key}"} if api_key else None,
        )
        self._served: set[str] | None = None  # None: the server does not list models; do not check
        self._served_at = float("-inf")
        self._caps: Capabilities | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def version(self) -> str:
        """llama.cpp's `/health` (503 while loading), else `/v1/models`, which every server has."""
        try:
            response = await self._client.get("/health", timeout=3.0)
            if response.status_code == 503:
                raise LlmbusError(
                    ErrorCode.BACKEND_UNAVAILABLE, f"the server at {self.url} is still loading its model"
                )
            if response.status_code != 200:
                response = await self._client.get("/v1/models", timeout=3.0)
                response.raise_for_status()
            return str(response.headers.get("server", "OpenAI-compatible"))
        except httpx.HTTPError as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, f"OpenAI-compatible server at {self.url} unreachable: {exc!r}"
            ) from exc

    async def models(self) -> list[str]:
        """The model ids `/v1/models` lists (with llama.cpp's aliases)."""
        try:
            response = await self._client.get("/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, f"cannot reach the model backend at {self.url}"
            ) from exc
        if response.status_code != 200:
            raise error_for_status(response.status_code, response.content, "")
        try:
            listed = _decode_models(response.content).data
        except msgspec.DecodeError as exc:
            raise LlmbusError(ErrorCode.BACKEND_ERROR, f"unreadable /v1/models answer: {exc}") from exc
        return [name for model in listed for name in (model.id, *model.aliases)]

    def _known_as(self, model: str) -> str | None:
        """`model` as the server lists it: as given, or without the `:latest` tag that Ollama-style
        names (and the janitors' inventory) carry."""
        if self._served is None:
            return None
        return next((n for n in (model, model.removesuffix(":latest")) if n in self._served), None)

    async def _served_name(self, model: str) -> str:
        """The name to send for `model`; `model_not_found` when the server does not serve it."""
        if (name := self._known_as(model)) is not None:
            return name
        now = time.monotonic()
        if now - self._served_at >= _MODELS_REFRESH_S:
            self._served_at = now
            try:
                names = await self.models()
            except LlmbusError as exc:
                if exc.code is ErrorCode.BACKEND_UNAVAILABLE:
                    raise
                names = None  # no usable model list: let the server judge the name
            if names is not None:
                # A llama.cpp started without an alias lists a file path: its stem names it too.
                self._served = {*names, *(PurePath(n).name.removesuffix(".gguf") for n in names)}
            else:
                self._served = None
        if self._served is None:
            return model
        if (name := self._known_as(model)) is not None:
            return name
        served = ", ".join(sorted(self._served)) or "none"
        raise LlmbusError(
            ErrorCode.MODEL_NOT_FOUND, f"model {model!r} not found on the backend (it serves: {served})"
        )

    async def _capabilities(self, request: GenerateRequest) -> Capabilities:
        """llama.cpp's `/props`, read once and only for a request it matters to."""
        if self._caps is not None or not _needs_caps(request):
            return self._caps or Capabilities()
        try:
            response = await self._client.get("/props", timeout=10.0)
            props = _decode_props(response.content) if response.status_code == 200 else None
        except (httpx.HTTPError, msgspec.DecodeError):
            return Capabilities()  # unknown: let the server judge (and maybe refuse) the request
        vision = props.modalities.vision if props and props.modalities else None
        tools = props.chat_template_caps.supports_tools if props and props.chat_template_caps else None
        self._caps = Capabilities(vision=vision, tools=tools)
        return self._caps

    @generation("openai")
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Piece]:
        path = "/v1/chat/completions" if request.is_chat else "/v1/completions"
        started = time.perf_counter()
        assembler = Assembler(request)
        with http_failures(self.url, "backend stream"):
            request = msgspec.structs.replace(request, model=await self._served_name(request.model))
            body = request_body(request, await self._capabilities(request), stream=self.stream)
            async with self._client.post_stream(path, _encode(body)) as response:
                if response.status_code != 200:
                    raise error_for_status(response.status_code, await response.aread(), request.model)
                if not self.stream:
                    for item in _whole_answer(_decode_chunk(await response.aread()), started, assembler):
                        yield item
                    return
                finish_reason: str | None = None
                usage: Usage | None = None
                speed: float | None = None
                answered_by: str | None = None
                pieces = 0
                first_at = last_at = 0.0
                async for data in sse_data(self._client.chunks(response)):
                    if data == _DONE:
                        break
                    chunk = _decode_chunk(data)
                    if chunk.error is not None:
                        raise _in_band(chunk.error)
                    for choice in chunk.choices:
                        for piece in assembler.pieces(choice):
                            last_at = time.perf_counter()
                            if not pieces:
                                first_at = last_at
                            pieces += 1
                            yield piece
                        if choice.finish_reason is not None:
                            finish_reason = choice.finish_reason
                            for piece in assembler.finish():
                                yield piece
                    answered_by = chunk.model or answered_by
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.timings is not None:
                        speed = chunk.timings.predicted_per_second
                if finish_reason is None:
                    raise LlmbusError(ErrorCode.BACKEND_ERROR, "backend closed the stream before it was done")
                completion = usage.completion_tokens if usage is not None else pieces
                if speed is None and pieces > 1 and last_at > first_at:
                    speed = (pieces - 1) / (last_at - first_at)  # servers without timings: as measured
                yield Final(
                    finish_reason=finish_reason,
                    prompt_tokens=usage.prompt_tokens if usage is not None else 0,
                    completion_tokens=completion,
                    tokens_per_s=speed,
                    model=answered_by,
                )

    @embedding("openai")
    async def embed(
        self, model: str, inputs: list[str], *, truncate: bool | None = None, dimensions: int | None = None
    ) -> EmbedResult:
        # OpenAI's API has no `truncate`: the server applies its own policy.
        body: dict[str, Any] = {"model": model, "input": inputs}
        if dimensions is not None:
            body["dimensions"] = dimensions
        with http_failures(self.url, "embedding call"):
            body["model"] = await self._served_name(model)
            response = await self._client.post("/v1/embeddings", content=_encode(body), headers=JSON)
            if response.status_code != 200:
                raise error_for_status(response.status_code, response.content, model)
            answer = _decode_embeddings(response.content)
        if len(answer.data) != len(inputs):
            raise LlmbusError(
                ErrorCode.BACKEND_ERROR,
                f"backend sent {len(answer.data)} embeddings for {len(inputs)} inputs",
            )
        answer.data.sort(key=lambda item: item.index)
        return EmbedResult(
            vectors=[item.embedding for item in answer.data],
            prompt_tokens=answer.usage.prompt_tokens if answer.usage is not None else 0,
        )


def _needs_caps(request: GenerateRequest) -> bool:
    return bool(request.tools) or any(m.images for m in request.messages or ())


def _whole_answer(answer: Chunk, started: float, assembler: Assembler) -> list[Piece]:
    if answer.error is not None:
        raise _in_band(answer.error)
    if not answer.choices:
        raise LlmbusError(ErrorCode.BACKEND_ERROR, "backend answered without a choice")
    choice = answer.choices[0]
    pieces = [*assembler.pieces(choice), *assembler.finish()]
    usage = answer.usage or Usage()
    speed = answer.timings.predicted_per_second if answer.timings is not None else None
    if speed is None and usage.completion_tokens:
        speed = usage.completion_tokens / (time.perf_counter() - started)
    final = Final(
        finish_reason=choice.finish_reason or "stop",
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        tokens_per_s=speed,
        model=answer.model,
    )
    return [*pieces, final]


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The `data:` payload of each Server-Sent Event in a byte stream, without decoding to str.

    Events end at a blank line; several `data:` lines in one event are joined with a newline;
    comments (`: ping`), `event:`, `id:` and `retry:` lines are skipped. Lines may end in CRLF.
    """
    rest = b""
    data: list[bytes] = []
    async for chunk in chunks:
        buffer = rest + chunk if rest else chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    yield data[0] if len(data) == 1 else b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        rest = buffer[start:]
    if rest.startswith(b"data:"):  # a last event without its blank line
        data.append(rest.rstrip(b"\r")[5:].lstrip(b" "))
    if data:
        yield b"\n".join(data)
