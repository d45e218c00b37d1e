"""`llmbus up` on a machine without Ollama: the embedded llama.cpp answers, or a clear message."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from services.local import models
from tests import llmbus_up
from tests.sse import collect


@pytest.mark.skipif(not models.installed() and not os.environ.get("CI"), reason="needs the local extra")
async def test_up_without_ollama_serves_the_embedded_model_end_to_end(tmp_path: Path) -> None:
    up = await llmbus_up.start(tmp_path)
    try:
        banner = await up.read_until("edge ready", 120)
        assert "embedded llama.cpp" in banner
        assert "only demonstrates the pipeline" in banner  # says plainly what this model is for
        found = re.search(r"embedded llama\.cpp at http://127\.0\.0\.1:(\d+)", banner)
        assert found, banner
        chat_port = int(found.group(1))

        body = {
            "model": models.CHAT_MODEL,
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": True,
            "options": {"num_predict": 8},
        }
        async with (
            httpx.AsyncClient(timeout=60) as http,
            http.stream("POST", f"{up.url}/v1/chat", json=body) as response,
        ):
            events = await collect(response)
        assert [e.event for e in events].count("token") >= 1
        assert events[-1].event == "done"

        await up.stop()
        assert llmbus_up.port_closed(up.http_port)
        assert llmbus_up.port_closed(chat_port)  # the embedded server stopped with the stack
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
