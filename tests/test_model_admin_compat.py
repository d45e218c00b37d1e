"""The model routes of the foreign APIs through the official clients: OpenAI's `models.retrieve`,
Ollama's `pull`, `create`, `copy`, `delete` and `show`, over the edge, NATS, the janitor and the
fake Ollama."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import httpx
import msgspec
import ollama
import openai
import pytest

from services.janitor.main import JanitorService
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama, normalize_name
from tests.test_admission import bearer, with_auth


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


# -- Ollama's pull, create, copy and delete: the janitor does them


async def _has(ol: ollama.AsyncClient, model: str, present: bool = True) -> None:
    async with asyncio.timeout(5):
        while (model in {m.model for m in (await ol.list()).models}) is not present:
            await asyncio.sleep(0.02)


async def test_ollama_pull_streams_ollamas_progress_lines_and_answers_once_without_stream(
    ol: ollama.AsyncClient, fake_ollama: FakeOllama
) -> None:
    await _has(ol, "llama3.2:1b")
    lines = [p async for p in await ol.pull("qwen2.5:7b", stream=True)]
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    assert [p.status for p in lines].count("success") == 1
    layers = {p.digest: p for p in lines if p.digest}
    assert len(layers) == 4  # one per layer, each with its own bytes, as Ollama streams them
    upstream = [json.loads(x) for x in (await _raw_pull(fake_ollama, "qwen2.5:7b")).splitlines()]
    assert {d: (p.completed, p.total) for d, p in layers.items()} == {
        u["digest"]: (u["completed"], u["total"]) for u in upstream if "completed" in u
    }
    await _has(ol, "qwen2.5:7b")

    done = await ol.pull("phi3:mini")  # stream=False: one answer when it is done
    assert done.status == "success"
    await _has(ol, "phi3:mini")

    fake_ollama.config.pullable = {"qwen2.5:7b", "phi3:mini"}
    with pytest.raises(ollama.ResponseError) as failed:
        await ol.pull("no-such-model:7b")
    assert failed.value.status_code == 404 and "file does not exist" in failed.value.error
    with pytest.raises(ollama.ResponseError) as in_band:  # streamed: Ollama's in-band error line
        async for _ in await ol.pull("no-such-model:7b", stream=True):
            pass
    assert "file does not exist" in in_band.value.error
    with pytest.raises(ollama.ResponseError) as insecure:
        await ol.pull("phi3:mini", insecure=True)
    assert insecure.value.status_code == 400 and "`insecure` is not supported" in insecure.value.error


async def _raw_pull(fake: FakeOllama, model: str) -> str:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        return (await http.post("/api/pull", json={"model": model})).text


async def test_ollama_create_carries_the_structured_request_quantize_and_the_old_modelfile(
    ol: ollama.AsyncClient, edge: Edge, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.models.append("llama3.2:1b-instruct-fp16")
    await _has(ol, "llama3.2:1b")
    done = await ol.create(
        "terse",
        from_="llama3.2:1b",
        system="Be terse.",
        template="{{ .Prompt }}!",
        parameters={"temperature": 0.1},
    )
    assert done.status == "success"
    sent = [c.body for c in fake_ollama.calls if c.path == "/api/create"][-1]
    assert (sent["from"], sent["system"], sent["template"]) == ("llama3.2:1b", "Be terse.", "{{ .Prompt }}!")
    assert sent["parameters"] == {"temperature": 0.1} and sent["model"] == "terse:latest"
    shown = await ol.show("terse")
    assert shown.modelfile and 'SYSTEM """Be terse."""' in shown.modelfile
    assert shown.parameters and "temperature" in shown.parameters

    steps = [
        p.status
        async for p in await ol.create(
            "small", from_="llama3.2:1b-instruct-fp16", quantize="q4_K_M", stream=True
        )
    ]
    assert "quantizing F16 model to Q4_K_M" in steps and steps[-1] == "success"
    await _has(ol, "small:latest")
    [small] = [m for m in (await ol.list()).models if m.model == "small:latest"]
    assert small.details is not None and small.details.quantization_level == "Q4_K_M"
    with pytest.raises(ollama.ResponseError) as quantized:
        await ol.create("again", from_="llama3.2:1b", quantize="q4_K_M")
    assert "only supported for F16 and F32" in quantized.value.error

    async with httpx.AsyncClient(base_url=fake_ollama.url) as http:  # a GGUF blob already on the host
        blob = b"GGUF fake weights"
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        assert (await http.post(f"/api/blobs/{digest}", content=blob)).status_code == 201
    assert (await ol.create("fromfile", files={"model.gguf": digest})).status == "success"
    assert [c.body for c in fake_ollama.calls if c.path == "/api/create"][-1]["files"] == {
        "model.gguf": digest
    }

    async with httpx.AsyncClient(base_url=f"{edge.url}/ollama") as http:  # before Ollama 0.5.5
        old = await http.post(
            "/api/create",
            json={"name": "legacy", "modelfile": "FROM llama3.2:1b\nSYSTEM Old style.\n", "stream": False},
        )
        assert old.status_code == 200 and old.json() == {"status": "success"}
        assert "Old style." in ((await ol.show("legacy")).modelfile or "")
        both = await http.post("/api/create", json={"model": "x", "modelfile": "FROM a", "from": "b"})
        assert both.status_code == 400 and "not both" in both.json()["error"]


async def test_ollama_copy_and_delete(ol: ollama.AsyncClient, fake_ollama: FakeOllama) -> None:
    await _has(ol, "llama3.2:1b")
    assert (await ol.copy("llama3.2:1b", "mine:1b")).status == "success"
    await _has(ol, "mine:1b")
    assert "mine:1b" in [normalize_name(m) for m in fake_ollama.config.models]
    assert (await ol.delete("mine:1b")).status == "success"
    await _has(ol, "mine:1b", present=False)
    with pytest.raises(ollama.ResponseError) as missing:
        await ol.delete("mine:1b")
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    with pytest.raises(ollama.ResponseError) as no_source:
        await ol.copy("no-such-model:7b", "other:1b")
    assert no_source.value.status_code == 404


async def test_ollama_model_management_needs_an_admin_key_when_auth_is_on(
    settings: Settings, tmp_path: Path, janitor: JanitorService
) -> None:
    async with Edge(with_auth(settings, tmp_path)) as edge:
        for who, status in (("a", 403), ("admin", 200)):
            api = ollama.AsyncClient(host=f"{edge.url}/ollama", headers=bearer(who))
            try:
                if status == 200:
                    assert (await api.copy("llama3.2:1b", "mine:1b")).status == "success"
                    continue
                for call in (
                    api.pull("phi3:mini"),
                    api.create("x", from_="llama3.2:1b"),
                    api.copy("llama3.2:1b", "y"),
                    api.delete("llama3.2:1b"),
                ):
                    with pytest.raises(ollama.ResponseError) as refused:
                        await call
                    assert refused.value.status_code == status and "admin key" in refused.value.error
            finally:
                await api._client.aclose()


async def test_ollama_show_has_the_hosts_modified_at_capabilities_and_context_length(
    ol: ollama.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.models.append("qwen3:4b")
    await _has(ol, "qwen3:4b")
    async with httpx.AsyncClient(base_url=fake_ollama.url) as http:
        upstream = (await http.post("/api/show", json={"model": "qwen3:4b"})).json()
    shown = await ol.show("qwen3:4b")
    assert shown.modified_at is not None
    assert shown.modified_at == datetime.fromisoformat(upstream["modified_at"])  # the host's, not ours
    assert shown.capabilities == ["completion", "tools", "thinking"] == upstream["capabilities"]
    assert shown.modelinfo is not None and shown.modelinfo["qwen3.context_length"] == 131072
    await ol.create("derived", from_="qwen3:4b", system="x")
    later = await ol.show("derived")
    assert later.modified_at is not None and later.modified_at > shown.modified_at


async def test_ollama_blob_uploads_are_refused_naming_where_to_upload(
    ol: ollama.AsyncClient, tmp_path: Path
) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF fake weights")
    with pytest.raises(ollama.ResponseError) as refused:
        await ol.create_blob(weights)
    assert refused.value.status_code == 400 and "`blobs` is not supported" in refused.value.error
