"""Several model hosts: one generator per host, each consuming only the models it names."""

from __future__ import annotations

import httpx
import msgspec
import pytest
from nats.js.errors import BadRequestError

from services.generator.main import Generator, consumer
from services.runtime.backends import OllamaBackend, OpenAIBackend, create_backend
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeConfig, FakeOllama


async def test_each_generator_serves_only_the_models_of_its_host(settings: Settings) -> None:
    async with (
        FakeOllama(FakeConfig()) as host_a,
        FakeOllama(FakeConfig()) as host_b,
    ):
        first = Generator(
            msgspec.structs.replace(settings, ollama_url=host_a.url, generate_models=["llama3.2:1b"])
        )
        second = Generator(
            msgspec.structs.replace(
                settings, backend_url=host_b.url, generate_models=["qwen2.5:0.5b", "qwen2.5-coder:1.5b"]
            )
        )
        await first.start()
        await second.start()
        try:
            async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
                for model in ("llama3.2:1b", "qwen2.5:0.5b", "qwen2.5-coder:1.5b", "llama3.2:1b"):
                    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                    response = await http.post("/v1/chat", json=body)
                    assert response.status_code == 200, response.text
                ready = await http.get("/health/ready")  # no `generator` consumer, yet ready
                assert ready.status_code == 200, ready.text
        finally:
            await first.stop(grace=0)
            await second.stop(grace=0)
    served_a = [call.body["model"] for call in host_a.calls if call.path == "/api/chat"]
    served_b = [call.body["model"] for call in host_b.calls if call.path == "/api/chat"]
    assert served_a == ["llama3.2:1b", "llama3.2:1b"]
    assert sorted(served_b) == ["qwen2.5-coder:1.5b", "qwen2.5:0.5b"]


async def test_a_generator_for_every_model_cannot_overlap_a_filtered_one(
    settings: Settings, generator: Generator
) -> None:
    filtered = Generator(msgspec.structs.replace(settings, generate_models=["llama3.2:1b"]))
    with pytest.raises(BadRequestError):
        await filtered.start()
    await filtered.nc.close()
    await filtered.backend.aclose()


def test_the_consumer_is_named_after_the_model_set() -> None:
    assert consumer([]) == ("generator", ["llm.req.generate.>"])
    durable, filters = consumer(["qwen2.5:0.5b", "llama3.2:1b"])
    from_env = Settings.from_env({"LLMBUS_GENERATE_MODELS": " llama3.2:1b , qwen2.5:0.5b ,"})
    assert durable == consumer(from_env.generate_models)[0]  # same set, same consumer
    assert durable.startswith("generator-llama3_2_1b-")
    assert filters == ["llm.req.generate.llama3%2E2:1b", "llm.req.generate.qwen2%2E5:0%2E5b"]
    with pytest.raises(SystemExit, match="LLMBUS_GENERATE_MODELS"):
        consumer(["bad model name!"])


async def test_the_backend_kind_and_url_come_from_settings() -> None:
    ollama = create_backend(Settings(ollama_url="http://a:1"))
    openai = create_backend(Settings(backend="openai", backend_url="http://b:2/"))
    await ollama.aclose()
    await openai.aclose()
    assert isinstance(ollama, OllamaBackend)
    assert ollama.url == "http://a:1"
    assert isinstance(openai, OpenAIBackend)
    assert openai.url == "http://b:2"
    assert Settings(backend_url="http://b:2", embed_backend_url="http://c:3").embed_url == "http://c:3"
    assert Settings(backend_url="http://b:2").embed_url == "http://b:2"
    whole = create_backend(Settings.from_env({"LLMBUS_BACKEND": "openai", "LLMBUS_BACKEND_STREAM": "false"}))
    await whole.aclose()
    assert isinstance(whole, OpenAIBackend)
    assert whole.stream is False
    with pytest.raises(SystemExit, match="invalid configuration"):
        Settings.from_env({"LLMBUS_BACKEND": "tgi"})
