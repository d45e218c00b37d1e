"""LLM backend clients: one small protocol, one implementation per server API."""

from services.runtime.backends.base import Backend, EmbedResult, Final, Piece, Scored, Thought
from services.runtime.backends.ollama import OllamaBackend
from services.runtime.backends.openai import OpenAIBackend
from services.runtime.settings import Settings

__all__ = [
    "Backend",
    "EmbedResult",
    "Final",
    "OllamaBackend",
    "OpenAIBackend",
    "Piece",
    "Scored",
    "Thought",
    "create_backend",
]


def create_backend(settings: Settings, url: str | None = None) -> Backend:
    """The client for `settings.backend` (`ollama` or `openai`) at `url` (default: the generate URL)."""
    url = url or settings.generate_url
    if settings.backend == "openai":
        return OpenAIBackend(
            url,
            connect_timeout=settings.backend_connect_timeout_s,
            api_key=settings.backend_api_key,
            stream=settings.backend_stream,
        )
    return OllamaBackend(url, connect_timeout=settings.backend_connect_timeout_s)
