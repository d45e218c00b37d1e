"""LLM backend clients: one small protocol, one implementation per server API."""

from services.runtime.backends.base import Backend, Final
from services.runtime.backends.ollama import OllamaBackend

__all__ = ["Backend", "Final", "OllamaBackend"]
