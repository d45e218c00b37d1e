"""The official JavaScript clients, `openai` (openai-node) and `ollama` (ollama-js), run with Node
against a real edge, generator (and embedder, janitor) and the fake Ollama. Each client's script in
tests/node runs one scenario and prints what the client returned; the checks are here.
`scripts/test.sh` installs the clients from tests/node's lock (npm ci) when Node is here."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from services.embedder.main import Embedder
from services.generator.main import Generator
from services.janitor.main import JanitorService
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama

NODE_DIR = Path(__file__).parent / "node"
NODE = shutil.which("node")
CLIENTS = ("openai", "ollama")
if NODE is None or not all((NODE_DIR / "node_modules" / name).is_dir() for name in CLIENTS):
    pytest.skip(
        "needs Node and the npm clients openai and ollama: ./scripts/test.sh installs them (tests/node)",
        allow_module_level=True,
    )

MODEL = "llama3.2:1b"


async def run(client: str, scenario: str, edge: Edge) -> Any:
    """`node tests/node/<client>_client.mjs <scenario> <edge url>`: its one line of JSON."""
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(NODE_DIR / f"{client}_client.mjs"),
        scenario,
        edge.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:  # the edge runs in this event loop: wait for Node without blocking it
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


@pytest.fixture
async def services(edge: Edge, generator: Generator) -> Edge:
    return edge


@pytest.fixture
async def embedder(settings: Settings) -> AsyncIterator[Embedder]:
    service = Embedder(settings)
    await service.start()
    yield service
    await service.stop(grace=0)


@pytest.fixture
async def janitor(settings: Settings, tmp_path: Path) -> AsyncIterator[JanitorService]:
    models_file = tmp_path / "models.toml"
    models_file.write_text(f'[[models]]\nname = "{MODEL}"\n')
    service = JanitorService(
        msgspec.structs.replace(settings, models_file=str(models_file), janitor_interval_s=0.05)
    )
    await service.start()
    yield service
    await service.stop()


async def inventory_has(edge: Edge, fake: FakeOllama) -> None:
    """Wait until the janitor's first report reached the edge (GET /v1/models lists the fake's models)."""
    async with httpx.AsyncClient(base_url=edge.url) as http, asyncio.timeout(5):
        while len((await http.get("/v1/models")).json()["data"]) < len(fake.config.models):
            await asyncio.sleep(0.02)


# -- openai-node


async def test_openai_chat_completion(services: Edge) -> None:
    answer = await run("openai", "chat", services)
    assert answer["object"] == "chat.completion"
    assert answer["model"] == MODEL
    [choice] = answer["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


async def test_openai_streamed_chat_assembles_text_finish_reason_and_usage(services: Edge) -> None:
    streamed = await run("openai", "stream", services)
    assert streamed["objects"] == ["chat.completion.chunk"]
    assert len(streamed["ids"]) == 1
    assert streamed["roles"][0] == "assistant"
    assert streamed["text"]
    assert streamed["finish_reasons"] == ["stop"]
    usage = streamed["usage"]  # stream_options.include_usage: a last chunk with no choices
    assert streamed["usage_chunk_choices"] == 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_openai_tool_call_round_trip(services: Edge, fake_ollama: FakeOllama) -> None:
    seen = await run("openai", "tools", services)
    for answer in (seen["asked"], seen["streamed"]):  # created, and assembled by the SDK's stream helper
        [choice] = answer["choices"]
        assert choice["finish_reason"] == "tool_calls"
        [call] = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "x"}
    final = seen["final"]["choices"][0]
    assert final["finish_reason"] == "stop" and final["message"]["content"]
    sent = [c for c in fake_ollama.calls if c.path == "/api/chat"][-1].body["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "x"}
    assert (sent[2]["role"], sent[2]["tool_name"], sent[2]["content"]) == ("tool", "get_weather", "sunny")


async def test_openai_models_list_and_retrieve(
    services: Edge, fake_ollama: FakeOllama, janitor: JanitorService
) -> None:
    await inventory_has(services, fake_ollama)
    seen = await run("openai", "models", services)
    assert sorted(m["id"] for m in seen["listed"]) == sorted(fake_ollama.config.models)
    assert all(m["object"] == "model" for m in seen["listed"])
    listed = {m["id"]: m for m in seen["listed"]}
    assert seen["retrieved"] == listed[MODEL]
    missing = seen["missing"]
    assert missing["isNotFound"] and missing["status"] == 404
    assert missing["code"] == "model_not_found"


async def test_openai_embeddings(services: Edge, embedder: Embedder) -> None:
    seen = await run("openai", "embeddings", services)
    one = seen["one"]
    assert one["object"] == "list" and one["model"] == "nomic-embed-text"
    [item] = one["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 64  # the fake's size
    # The SDK's default (base64, decoded by it) gives the vector `float` gives.
    assert item["embedding"] == seen["explicit"]["data"][0]["embedding"]
    assert one["usage"]["prompt_tokens"] == one["usage"]["total_tokens"] > 0
    assert [d["index"] for d in seen["many"]["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 16 for d in seen["many"]["data"])


async def test_openai_errors_are_the_sdks_classes_with_openais_shape(services: Edge) -> None:
    seen = await run("openai", "errors", services)
    for unknown in (seen["unknown"], seen["streamed"]):
        assert unknown["isNotFound"] and unknown["isAPIError"], unknown
        assert unknown["status"] == 404
        assert unknown["code"] == "model_not_found"
        assert {"message", "type", "param", "code"} <= set(unknown["error"])
        assert "no-such-model:7b" in unknown["error"]["message"]
    invalid = seen["invalid"]
    assert invalid["isBadRequest"] and invalid["status"] == 400, invalid
    assert invalid["type"] == "invalid_request_error"
    assert "temperature" in (invalid["param"] or invalid["error"]["message"])


async def test_openai_abort_mid_stream_cancels_upstream(services: Edge, fake_ollama: FakeOllama) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.05
    seen = await run("openai", "abort", services)
    assert seen == {"chunks": 3, "error": None}  # no chunk after the abort; the SDK ends the loop
    call = (await fake_ollama.wait_disconnected(1, timeout=5))[0]
    assert call.tokens_sent < 50  # stopped soon after, not after 1000 tokens


# -- ollama-js


async def test_ollama_chat_whole_and_streamed(services: Edge) -> None:
    seen = await run("ollama", "chat", services)
    whole, parts = seen["whole"], seen["parts"]
    assert whole["model"] == MODEL and whole["done"] is True and whole["done_reason"] == "stop"
    assert whole["message"]["role"] == "assistant" and whole["message"]["content"]
    assert whole["eval_count"] > 0 and whole["total_duration"] > 0
    assert [p["done"] for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p["message"]["content"] for p in parts) == whole["message"]["content"]
    assert parts[-1]["done_reason"] == "stop" and parts[-1]["eval_count"] == whole["eval_count"]


async def test_ollama_generate_whole_and_streamed(services: Edge) -> None:
    seen = await run("ollama", "generate", services)
    whole, parts = seen["whole"], seen["parts"]
    assert whole["done"] is True and whole["response"]
    assert "".join(p["response"] for p in parts) == whole["response"]
    assert parts[-1]["done"] is True and parts[-1]["done_reason"] == "stop"


async def test_ollama_embed(services: Edge, embedder: Embedder) -> None:
    seen = await run("ollama", "embed", services)
    [vector] = seen["one"]["embeddings"]
    assert len(vector) == 64
    assert seen["one"]["model"] == "nomic-embed-text"
    assert [len(v) for v in seen["many"]["embeddings"]] == [16, 16]


async def test_ollama_list_and_show(services: Edge, fake_ollama: FakeOllama, janitor: JanitorService) -> None:
    await inventory_has(services, fake_ollama)
    seen = await run("ollama", "models", services)
    assert sorted(m["model"] for m in seen["listed"]["models"]) == sorted(fake_ollama.config.models)
    assert all(m["details"]["family"] and m["digest"] for m in seen["listed"]["models"])
    shown = seen["shown"]
    assert shown["details"]["family"] == "llama"
    assert "completion" in shown["capabilities"]
    assert shown["model_info"]
    missing = seen["missing"]
    assert missing["name"] == "ResponseError" and missing["status_code"] == 404
    assert "not found" in missing["error"]


async def test_ollama_errors_are_response_errors(services: Edge) -> None:
    seen = await run("ollama", "errors", services)
    for error in (seen["unknown"], seen["streamed"]):
        assert error["name"] == "ResponseError", error
        assert error["status_code"] == 404
        assert "not found" in error["error"] and error["message"] == error["error"]


async def test_ollama_abort_mid_stream_cancels_upstream(services: Edge, fake_ollama: FakeOllama) -> None:
    fake_ollama.config.tokens = 1000
    fake_ollama.config.token_interval = 0.05
    seen = await run("ollama", "abort", services)
    assert seen["parts"] == 3
    assert seen["error"]["name"] == "AbortError", seen
    call = (await fake_ollama.wait_disconnected(1, timeout=5))[0]
    assert call.tokens_sent < 50
