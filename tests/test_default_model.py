"""A native request that names no model gets the server's default: `LLMBUS_DEFAULT_MODEL`, else
the routes file's default route's model."""

from __future__ import annotations

import httpx
import msgspec

from services.generator.main import Generator
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama

CHAT: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}]}


async def answer(settings: Settings, path: str, body: dict[str, object]) -> httpx.Response:
    gen = Generator(settings)
    await gen.start()
    try:
        async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
            return await http.post(path, json=body)
    finally:
        await gen.stop(grace=0)


async def test_the_setting_names_the_default(settings: Settings, fake_ollama: FakeOllama) -> None:
    configured = msgspec.structs.replace(settings, default_model="qwen2.5:0.5b")
    response = await answer(configured, "/v1/chat", CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "qwen2.5:0.5b"
    assert fake_ollama.calls[-1].body["model"] == "qwen2.5:0.5b"


async def test_else_the_default_route(settings: Settings, fake_ollama: FakeOllama) -> None:
    response = await answer(settings, "/v1/generate", {"prompt": "hi"})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "llama3.2:1b"  # infra/routes.toml: default = "chat"


async def test_a_named_model_wins(settings: Settings) -> None:
    configured = msgspec.structs.replace(settings, default_model="qwen2.5:0.5b")
    response = await answer(configured, "/v1/chat", CHAT | {"model": "llama3.2:1b"})
    assert response.json()["model"] == "llama3.2:1b"
