"""The official `ollama` Python client works against the edge's `/ollama` routes, over real NATS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import ollama
import pytest

from services.embedder.main import Embedder
from services.generator.main import Generator
from services.janitor.main import JanitorService
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.sse import sse_events

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
async def client(edge: Edge, generator: Generator) -> AsyncIterator[ollama.AsyncClient]:
    api = ollama.AsyncClient(host=f"{edge.url}/ollama")
    yield api
    await api._client.aclose()


async def test_streaming_chat_matches_the_native_stream(client: ollama.AsyncClient, edge: Edge) -> None:
    pieces, last = [], None
    async for part in await client.chat(model="llama3.2:1b", messages=MESSAGES, stream=True):
        pieces.append(part.message.content)
        last = part
    assert last is not None
    assert last.done
    assert last.done_reason == "stop"
    assert last.eval_count == 8
    async with (
        httpx.AsyncClient(base_url=edge.url) as http,
        http.stream(
            "POST", "/v1/chat", json={"model": "llama3.2:1b", "messages": MESSAGES, "stream": True}
        ) as r,
    ):
        native = [e.data["text"] async for e in sse_events(r) if e.event == "token"]
    assert pieces[:-1] == native  # token for token; the final line carries the stats, no text
    assert pieces[-1] == ""


async def test_generate_non_streaming(client: ollama.AsyncClient) -> None:
    answer = await client.generate(model="llama3.2:1b", prompt="Once upon a time", options={"num_predict": 3})
    assert answer.done
    assert answer.done_reason == "length"
    assert len(answer.response.split()) == 3
    assert answer.total_duration is not None
    assert answer.total_duration > 0


async def test_options_llmbus_cannot_carry_are_refused_the_others_carried(
    client: ollama.AsyncClient, fake_ollama: FakeOllama, settings: Settings
) -> None:
    with pytest.raises(ollama.ResponseError) as refused:  # a runner option: never silently dropped
        await client.generate(model="llama3.2:1b", prompt="x", options={"num_thread": 2, "temperature": 0.1})
    assert refused.value.status_code == 400
    assert "`options.num_thread` is not supported" in refused.value.error
    answer = await client.generate(model="llama3.2:1b", prompt="x", options={"temperature": 0.1})
    assert answer.done
    calls = await fake_ollama.wait_calls(1, path="/api/generate")
    # (num_predict: no max_tokens asked gets LLMBUS_MAX_OUTPUT_TOKENS)
    assert calls[-1].body["options"] == {"temperature": 0.1, "num_predict": settings.max_output_tokens}


async def test_errors_come_in_ollama_shape(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        await client.chat(model="no-such-model:7b", messages=MESSAGES)
    assert info.value.status_code == 404
    assert "not found" in info.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        await client.chat(model="llama3.2:1b", messages=[], keep_alive="soon")
    assert bad.value.status_code == 400 and "keep_alive" in bad.value.error


async def test_disconnect_mid_stream_cancels_upstream(
    edge: Edge, generator: Generator, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.05
    body = {"model": "llama3.2:1b", "messages": MESSAGES}
    async with (
        httpx.AsyncClient(base_url=edge.url) as http,
        http.stream("POST", "/ollama/api/chat", json=body) as r,
    ):
        lines = 0
        async for _ in r.aiter_lines():
            lines += 1
            if lines == 3:
                break
    call = (await fake_ollama.wait_disconnected(1, timeout=5))[0]
    assert call.tokens_sent < 50


async def test_version_and_root(edge: Edge) -> None:
    async with httpx.AsyncClient(base_url=edge.url) as http:
        assert (await http.get("/ollama/api/version")).json()["version"]
        assert (await http.get("/ollama/")).text == "Ollama is running"


async def test_streaming_generate_matches_the_native_stream_token_for_token(
    client: ollama.AsyncClient, edge: Edge
) -> None:
    parts = [
        part
        async for part in await client.generate(model="llama3.2:1b", prompt="Once upon a time", stream=True)
    ]
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == len(parts) - 1
    body = {"model": "llama3.2:1b", "prompt": "Once upon a time", "stream": True}
    async with (
        httpx.AsyncClient(base_url=edge.url) as http,
        http.stream("POST", "/v1/generate", json=body) as r,
    ):
        native = [e.data["text"] async for e in sse_events(r) if e.event == "token"]
    assert [part.response for part in parts[:-1]] == native


# -- embeddings: the same bus path as POST /v1/embed

EMBED_MODEL = "nomic-embed-text"


@pytest.fixture
async def embedder(settings: Settings) -> AsyncIterator[Embedder]:
    service = Embedder(settings)
    await service.start()
    yield service
    await service.stop(grace=0)


async def test_embed_and_legacy_embeddings_match_the_native_embed_route(
    client: ollama.AsyncClient, edge: Edge, embedder: Embedder
) -> None:
    texts = ["the quick river", "a green stone"]
    answer = await client.embed(model=EMBED_MODEL, input=texts)
    async with httpx.AsyncClient(base_url=edge.url) as http:
        native = (await http.post("/v1/embed", json={"model": EMBED_MODEL, "input": texts})).json()
    assert [list(v) for v in answer.embeddings] == native["embeddings"]
    assert answer.model == EMBED_MODEL
    assert answer.prompt_eval_count == 3 + 2 + 3 + 2  # the fake: words + 2 per input
    assert native["usage"] == {"prompt_tokens": 0, "cached": 2}  # the same cache: one embed path
    assert answer.total_duration is not None and answer.total_duration > 0
    legacy = await client.embeddings(model=EMBED_MODEL, prompt="a green stone")
    assert list(legacy.embedding) == native["embeddings"][1]
    shorter = await client.embed(model=EMBED_MODEL, input="a green stone", dimensions=16)
    assert len(shorter.embeddings[0]) == 16


async def test_embed_errors_come_in_ollama_shape(client: ollama.AsyncClient, embedder: Embedder) -> None:
    with pytest.raises(ollama.ResponseError) as empty:
        await client.embed(model=EMBED_MODEL, input=[])
    assert empty.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as unknown:
        await client.embed(model="no-such-model:7b", input="x")
    assert unknown.value.status_code == 404
    assert "not found" in unknown.value.error


# -- models: the janitors' inventory, as GET /v1/models lists it


@pytest.fixture
async def janitor(settings: Settings, tmp_path: Path) -> AsyncIterator[JanitorService]:
    models_file = tmp_path / "models.toml"
    models_file.write_text('[[models]]\nname = "llama3.2:1b"\nwarm = true\n')  # loaded at start
    service = JanitorService(
        msgspec.structs.replace(settings, models_file=str(models_file), janitor_interval_s=0.05)
    )
    await service.start()
    yield service
    await service.stop()


async def _loaded(client: ollama.AsyncClient) -> ollama.ProcessResponse:
    async with asyncio.timeout(5):
        while not (running := await client.ps()).models:
            await asyncio.sleep(0.02)
    return running


async def test_list_ps_and_show_come_from_the_inventory_in_ollama_shape(
    client: ollama.AsyncClient, edge: Edge, fake_ollama: FakeOllama, janitor: JanitorService
) -> None:
    running = await _loaded(client)
    assert [m.model for m in running.models] == ["llama3.2:1b"]
    [loaded] = running.models
    assert loaded.size_vram and loaded.expires_at is not None and loaded.details is not None
    assert loaded.details.family == "llama"

    listed = await client.list()
    async with httpx.AsyncClient(base_url=fake_ollama.url) as http:
        upstream = (await http.get("/api/tags")).json()["models"]
    assert sorted(m.model or "" for m in listed.models) == sorted(m["model"] for m in upstream)
    by_name = {m.model: m for m in listed.models}
    for model in upstream:  # the fields Ollama gives, as Ollama gives them
        ours = by_name[model["model"]]
        assert (ours.size, ours.digest) == (model["size"], model["digest"])
        assert ours.details is not None and ours.modified_at is not None
        assert ours.details.family == model["details"]["family"]
        assert ours.details.parameter_size == model["details"]["parameter_size"]
        assert ours.details.quantization_level == model["details"]["quantization_level"]

    shown = await client.show("llama3.2:1b")
    assert shown.details is not None and shown.details.family == "llama"
    assert "completion" in (shown.capabilities or [])
    assert shown.modelfile and shown.template is not None and shown.modelinfo
    with pytest.raises(ollama.ResponseError) as missing:
        await client.show("no-such-model:7b")
    assert missing.value.status_code == 404
    assert "not found" in missing.value.error


async def test_nothing_to_answer_loads_the_model_and_keep_alive_0_unloads_it_like_ollama(
    client: ollama.AsyncClient, fake_ollama: FakeOllama, janitor: JanitorService
) -> None:
    await _loaded(client)  # warm: loaded at start
    unloaded = await client.generate(model="llama3.2:1b", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload" and unloaded.response == ""
    async with asyncio.timeout(5):
        while (await client.ps()).models:
            await asyncio.sleep(0.02)

    loaded = await client.chat(model="llama3.2:1b", messages=[], keep_alive="10m")
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""
    [running] = (await _loaded(client)).models
    assert running.expires_at is not None
    expires_in = running.expires_at.timestamp() - time.time()
    assert 590 < expires_in <= 600  # the keep_alive asked for, not the idle TTL
    calls = [c.body for c in fake_ollama.calls if c.path == "/api/generate" and "prompt" not in c.body]
    assert [c["keep_alive"] for c in calls][-2:] == [0, "600s"]  # Ollama's own unload, then load
    assert all(c.path != "/api/chat" for c in fake_ollama.calls)  # nothing was generated


async def test_list_and_ps_are_empty_before_any_janitor_reports(client: ollama.AsyncClient) -> None:
    assert (await client.list()).models == []
    assert (await client.ps()).models == []
