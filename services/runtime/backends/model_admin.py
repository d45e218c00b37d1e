"""What the janitor needs from a model server to manage its models, whatever API it speaks.

One protocol, one implementation per server API: `OllamaAdmin` (everything) and `OpenAIAdmin`
(listing and health everywhere; load and unload only on llama.cpp's router mode). The janitor
asks `supports(op, model)` before an operation instead of knowing which kind of server it has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from services.runtime.backends.ollama_admin import CreateSpec, OllamaAdmin, Running, Status, Tag
from services.runtime.backends.openai_admin import OpenAIAdmin, cannot
from services.runtime.settings import Settings

__all__ = ["CreateSpec", "ModelAdmin", "Running", "Status", "Tag", "cannot", "create_model_admin"]


class ModelAdmin(Protocol):
    url: str
    kind: str  # `ollama` or `openai`: for logs and the admin service's metadata

    def supports(self, op: str, model: str | None = None) -> bool:
        """Whether `op` (`pull`, `create`, `copy`, `delete`, `load`, `unload`) works here (for `model`)."""
        ...

    async def tags(self) -> list[Tag]:
        """Every model the server has (list); raises `LlmbusError(backend_unavailable)` when down."""
        ...

    async def ps(self) -> list[Running]:
        """The models loaded in memory now."""
        ...

    async def show(self, model: str) -> dict[str, Any]:
        """Ollama's `/api/show` shape: `details`, `model_info`, `modelfile`, ... (what the server has)."""
        ...

    def pull(self, model: str) -> AsyncIterator[Status]: ...

    def create(self, model: str, spec: CreateSpec) -> AsyncIterator[Status]: ...

    async def copy(self, source: str, destination: str) -> None: ...

    async def delete(self, model: str) -> None: ...

    async def load(self, model: str, keep_alive_s: float | None) -> None: ...

    async def unload(self, model: str) -> None: ...

    async def aclose(self) -> None: ...


def create_model_admin(settings: Settings) -> ModelAdmin:
    """The admin client for `settings.backend`: an OpenAI-compatible host is its generate server
    and, when it is another one, its embedding server (the embedded default runs two)."""
    if settings.backend == "openai":
        urls = list(dict.fromkeys([settings.generate_url, settings.embed_url]))
        return OpenAIAdmin(
            urls, connect_timeout=settings.backend_connect_timeout_s, api_key=settings.backend_api_key
        )
    return OllamaAdmin(settings.generate_url, connect_timeout=settings.backend_connect_timeout_s)
