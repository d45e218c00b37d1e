"""The model routes of the foreign APIs through the official clients: OpenAI's `models.retrieve`,
Ollama's `pull`, `create`, `copy`, `delete` and `show`, over the edge, NATS, the janitor and the
fake Ollama."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import ollama
import openai
import pytest

from services.janitor.main import JanitorService
from services.runtime.settings import Settings
from tests.conftest import Edge


@pytest.fixture
async def janitor(settings: Settings, tmp_path: Path) -> AsyncIterator[JanitorService]:
    models_file = tmp_path / "models.toml"
    models_file.write_text('[[models]]\nname = "llama3.2:1b"\n')
    service = JanitorService(
        msgspec.structs.replace(settings, models_file=str(models_file), janitor_interval_s=0.05)
    )
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def oa(edge: Edge, janitor: JanitorService) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def ol(edge: Edge, janitor: JanitorService) -> AsyncIterator[ollama.AsyncClient]:
    api = ollama.AsyncClient(host=f"{edge.url}/ollama")
    yield api
    await api._client.aclose()


async def _listed(oa: openai.AsyncOpenAI) -> list[str]:
    async with asyncio.timeout(5):
        while not (ids := [m.id async for m in oa.models.list()]):
            await asyncio.sleep(0.02)
    return ids


async def test_openai_models_retrieve_answers_the_listed_entry_and_404_in_openai_shape(
    oa: openai.AsyncOpenAI,
) -> None:
    ids = await _listed(oa)
    model = await oa.models.retrieve("llama3.2:1b")
    assert model.id == "llama3.2:1b" and model.object == "model" and model.owned_by == "llmbus"
    assert model.created > 0 and "llama3.2:1b" in ids
    assert (await oa.models.retrieve("llama3.2:1b")).model_dump() == model.model_dump()
    with pytest.raises(openai.NotFoundError) as missing:
        await oa.models.retrieve("no-such-model:7b")
    error = missing.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    assert "no-such-model:7b" in error["message"] and error["type"]
