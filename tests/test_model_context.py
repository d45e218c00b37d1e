"""A model's context length: the janitor reads it from Ollama's `/api/show` once per model, the
inventory carries it, and the edge measures prompts against it (`400 prompt_too_large`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import msgspec

from services.generator.main import Generator
from services.janitor.main import JanitorService
from services.runtime.settings import Settings
from tests.fakes.ollama import FakeOllama

MODEL = "llama3.2:1b"
LONG = "word " * 100  # 500 characters: about 125 tokens


@asynccontextmanager
async def janitor(settings: Settings, tmp_path: Path) -> AsyncIterator[JanitorService]:
    models_file = tmp_path / "models.toml"
    models_file.write_text("")
    service = JanitorService(
        msgspec.structs.replace(settings, models_file=str(models_file), janitor_interval_s=0.05)
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def listed(client: httpx.AsyncClient, model: str) -> dict[str, object]:
    async with asyncio.timeout(5):
        while True:
            data = (await client.get("/v1/models")).json()["data"]
            found = next((m for m in data if m["id"] == model), None)
            if found is not None:
                return found  # type: ignore[no-any-return]
            await asyncio.sleep(0.02)


async def test_the_inventory_carries_each_models_trained_context_read_once_from_api_show(
    settings: Settings, fake_ollama: FakeOllama, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    fake_ollama.config.context_lengths = {"qwen2.5:0.5b": 32768}
    async with janitor(settings, tmp_path):
        qwen = await listed(client, "qwen2.5:0.5b")
        assert qwen["hosts"][0]["context_length"] == 32768  # type: ignore[index]
        llama = await listed(client, MODEL)
        assert llama["hosts"][0]["context_length"] == 131072  # type: ignore[index]
        embed = await listed(client, "nomic-embed-text:latest")
        assert embed["hosts"][0]["context_length"] == 2048  # type: ignore[index]
        ticks = len([c for c in fake_ollama.calls if c.path == "/api/tags"])
        await fake_ollama.wait_for(
            lambda: len([c for c in fake_ollama.calls if c.path == "/api/tags"]) > ticks + 5
        )
    shown = sorted(c.body["model"] for c in fake_ollama.calls if c.path == "/api/show")
    assert shown == sorted(fake_ollama.config.models)  # once per model, not on every tick
    # A restarted janitor takes the lengths it wrote before instead of asking again.
    async with janitor(settings, tmp_path):
        ticks = len([c for c in fake_ollama.calls if c.path == "/api/tags"])
        await fake_ollama.wait_for(
            lambda: len([c for c in fake_ollama.calls if c.path == "/api/tags"]) > ticks + 2
        )
        assert (await listed(client, "qwen2.5:0.5b"))["hosts"][0]["context_length"] == 32768  # type: ignore[index]
    assert len([c for c in fake_ollama.calls if c.path == "/api/show"]) == len(shown)


async def test_a_prompt_over_the_models_context_from_the_inventory_is_400_prompt_too_large(
    settings: Settings, fake_ollama: FakeOllama, generator: Generator, tmp_path: Path
) -> None:
    from tests.conftest import Edge

    fake_ollama.config.context_lengths = {MODEL: 100}
    async with (
        Edge(msgspec.structs.replace(settings, context_tokens=8192)) as edge,
        httpx.AsyncClient(base_url=edge.url, timeout=10) as http,
        janitor(settings, tmp_path),
    ):
        llama = await listed(http, MODEL)
        assert llama["hosts"][0]["context_length"] == 100  # type: ignore[index]
        chat = {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}
        refused = await http.post("/v1/chat", json=chat)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "prompt_too_large"
        assert "context of 100" in refused.json()["error"]["message"]
        # Ollama lowers a num_ctx over the trained context to it: asking for more does not help.
        roomy = await http.post("/v1/chat", json={**chat, "options": {"num_ctx": 4096}})
        assert roomy.status_code == 400 and roomy.json()["error"]["code"] == "prompt_too_large"
        # A model with a long context takes the same prompt; a short prompt fits the short context.
        assert (await http.post("/v1/chat", json={**chat, "model": "qwen2.5:0.5b"})).status_code == 200
        # ...unless the request asks the model to read less than the prompt.
        narrow = {**chat, "model": "qwen2.5:0.5b", "options": {"num_ctx": 64}}
        short = await http.post("/v1/chat", json=narrow)
        assert short.status_code == 400 and "context of 64" in short.json()["error"]["message"]
        assert (
            await http.post("/v1/chat", json={**chat, "messages": [{"role": "user", "content": "hi"}]})
        ).status_code == 200
