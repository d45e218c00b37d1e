"""Ollama's model management API: tags, ps, show, pull, create, copy, delete, load and unload.

Separate from `OllamaBackend` (the generation hot path): only the janitor uses it, and its calls
are few and slow (a pull runs for minutes), so it keeps its own small connection pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec

from contracts import ErrorCode, LlmbusError
from services.runtime.backends.ollama import _ndjson, error_for_status


class Details(msgspec.Struct):
    family: str = ""
    parameter_size: str = ""
    quantization_level: str = ""


class Tag(msgspec.Struct):
    """One model on the host's disk (`/api/tags`)."""

    name: str
    size: int = 0
    digest: str = ""
    details: Details = msgspec.field(default_factory=Details)
    context_length: int | None = None  # when the listing says (OpenAI-compatible servers); Ollama: `show`


class Running(msgspec.Struct):
    """One loaded model (`/api/ps`)."""

    name: str
    size: int = 0
    size_vram: int = 0
    expires_at: str = ""
    digest: str = ""

    @property
    def expires(self) -> float | None:
        return parse_time(self.expires_at)


class Status(msgspec.Struct):
    """One NDJSON line of a pull or create."""

    status: str = ""
    digest: str = ""
    total: int = 0
    completed: int = 0
    error: str | None = None


class CreateSpec(msgspec.Struct, omit_defaults=True):
    """A parsed Modelfile, as the structured `/api/create` body of Ollama 0.5.5 and later."""

    from_: str = msgspec.field(default="", name="from")
    system: str | None = None
    template: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    files: dict[str, str] | None = None  # blobs already on the host: file name -> `sha256:<hex>`
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    from_file: str | None = None  # a local GGUF file: uploaded as a blob, then passed as `files`


class _Tags(msgspec.Struct):
    models: list[Tag] = msgspec.field(default_factory=list)


class _Ps(msgspec.Struct):
    models: list[Running] = msgspec.field(default_factory=list)


_decode_tags = msgspec.json.Decoder(_Tags).decode
_decode_ps = msgspec.json.Decoder(_Ps).decode
_decode_status = msgspec.json.Decoder(Status).decode
_encode = msgspec.json.Encoder().encode
_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_time(text: str) -> float | None:
    """Go's RFC 3339 with nanoseconds (`2025-01-02T03:04:05.123456789+01:00`) as Unix seconds."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(_FRACTION.sub(r"\1", text.replace("Z", "+00:00"))).timestamp()
    except ValueError:
        return None


def _keep_alive(seconds: float | None) -> int | str:
    # Ollama: a negative number keeps the model loaded forever, 0 unloads, a string is a duration.
    if seconds is None or seconds < 0:
        return -1
    return f"{seconds:g}s"


def _in_band_error(message: str, model: str) -> LlmbusError:
    if "file does not exist" in message or "not found" in message:
        return LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} not found: {message}")
    return LlmbusError(ErrorCode.BACKEND_ERROR, f"Ollama: {message}")


class OllamaAdmin:
    kind = "ollama"

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        # Pulls stream for minutes and uploads are large: no read timeout, a bounded connect.
        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(None, connect=connect_timeout)
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def supports(self, op: str, model: str | None = None) -> bool:
        return True  # Ollama has an API for every operation (`model_admin.ModelAdmin`)

    async def _call(self, method: str, path: str, model: str, body: Any = None, wait_s: float = 30) -> bytes:
        try:
            response = await self._client.request(
                method,
                path,
                content=None if body is None else _encode(body),
                headers={"content-type": "application/json"},
                timeout=wait_s,
            )
        except httpx.HTTPError as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, f"Ollama at {self.url} is unreachable: {exc!r}"
            ) from exc
        if response.status_code != 200:
            raise error_for_status(response.status_code, response.content, model)
        return response.content

    async def tags(self) -> list[Tag]:
        return _decode_tags(await self._call("GET", "/api/tags", "")).models

    async def ps(self) -> list[Running]:
        return _decode_ps(await self._call("GET", "/api/ps", "")).models

    async def show(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = msgspec.json.decode(
            await self._call("POST", "/api/show", model, {"model": model})
        )
        return result

    async def copy(self, source: str, destination: str) -> None:
        await self._call("POST", "/api/copy", source, {"source": source, "destination": destination})

    async def delete(self, model: str) -> None:
        await self._call("DELETE", "/api/delete", model, {"model": model})

    async def unload(self, model: str) -> None:
        await self._call("POST", "/api/generate", model, {"model": model, "keep_alive": 0})

    async def load(self, model: str, keep_alive_s: float | None) -> None:
        """Loads without generating; embedding models cannot generate, so they load by embedding."""
        body = {"model": model, "keep_alive": _keep_alive(keep_alive_s)}
        # Loading can take minutes for a large model on a slow disk.
        try:
            await self._call("POST", "/api/generate", model, body, wait_s=600)
        except LlmbusError as exc:
            if exc.code is not ErrorCode.BAD_REQUEST:  # "does not support generate"
                raise
            await self._call("POST", "/api/embed", model, {**body, "input": []}, wait_s=600)

    def pull(self, model: str) -> AsyncIterator[Status]:
        return self._statuses("/api/pull", model, {"model": model, "stream": True})

    async def create(self, model: str, spec: CreateSpec) -> AsyncIterator[Status]:
        body: dict[str, Any] = msgspec.to_builtins(spec)
        body.pop("from_file", None)
        if spec.from_file is not None:
            path = Path(spec.from_file)
            digest = await self._push_blob(path)
            body["files"] = {**(spec.files or {}), path.name: digest}
        async for status in self._statuses("/api/create", model, {"model": model, "stream": True, **body}):
            yield status

    async def _push_blob(self, path: Path) -> str:
        """Uploads a local file (once: Ollama keeps blobs by digest) and returns its digest."""
        try:
            digest = "sha256:" + await asyncio.to_thread(_sha256, path)
        except OSError as exc:
            raise LlmbusError(ErrorCode.BAD_REQUEST, f"cannot read {path}: {exc.strerror}") from exc
        try:
            head = await self._client.head(f"/api/blobs/{digest}", timeout=30)
            if head.status_code != 200:
                response = await self._client.post(f"/api/blobs/{digest}", content=_chunks(path))
                if response.status_code not in (200, 201):
                    raise error_for_status(response.status_code, response.content, path.name)
        except httpx.HTTPError as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, f"Ollama at {self.url} is unreachable: {exc!r}"
            ) from exc
        return digest

    async def _statuses(self, path: str, model: str, body: dict[str, Any]) -> AsyncIterator[Status]:
        """Ollama's NDJSON status stream; a failure in-band (`{"error": ...}`) raises."""
        try:
            async with self._client.stream(
                "POST", path, content=_encode(body), headers={"content-type": "application/json"}
            ) as response:
                if response.status_code != 200:
                    raise error_for_status(response.status_code, await response.aread(), model)
                async for line in _ndjson(response.aiter_bytes()):
                    status = _decode_status(line)
                    if status.error is not None:
                        raise _in_band_error(status.error, model)
                    yield status
                    if status.status == "success":
                        return
            raise LlmbusError(ErrorCode.BACKEND_ERROR, f"Ollama ended {path} for {model!r} without success")
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise LlmbusError(ErrorCode.BACKEND_UNAVAILABLE, f"Ollama at {self.url} is unreachable") from exc
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            raise LlmbusError(ErrorCode.BACKEND_ERROR, f"Ollama {path} failed: {exc!r}") from exc


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    """A model file streamed to Ollama without holding gigabytes in memory."""
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, 1 << 20):
            yield chunk
