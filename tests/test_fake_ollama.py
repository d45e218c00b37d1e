"""The fake Ollama must behave like Ollama's HTTP API; these tests pin the shapes callers rely on."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.fakes.ollama import OLLAMA_VERSION, FakeConfig, FakeOllama

ROOT = Path(__file__).resolve().parents[1]
MODEL = "llama3.2:1b"
USER = [{"role": "user", "content": "why is the sky blue?"}]
PIECE = re.compile(r"\S+\s*")


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as server:
        yield server


@pytest.fixture
async def api(fake: FakeOllama) -> AsyncIterator[httpx.AsyncClient]:
    """Talks to the fake directly (conftest's `client` talks to the gateway)."""
    async with httpx.AsyncClient(base_url=fake.url, timeout=5.0) as http:
        yield http


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in response.text.splitlines()]


async def chat_text(api: httpx.AsyncClient, messages: list[dict[str, str]], **extra: Any) -> str:
    response = await api.post(
        "/api/chat", json={"model": MODEL, "messages": messages, "stream": False, **extra}
    )
    assert response.status_code == 200, response.text
    content: str = response.json()["message"]["content"]
    return content


async def read_chat_stream(api: httpx.AsyncClient, body: dict[str, Any], into: list[str]) -> None:
    """Append each streamed chunk's content to ``into`` (kept if the stream breaks)."""
    async with api.stream("POST", "/api/chat", json=body) as response:
        async for line in response.aiter_lines():
            into.append(msgspec.json.decode(line)["message"]["content"])


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- chat / generate


async def test_chat_stream_chunk_shapes_and_final_stats(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    response = await api.post("/api/chat", json={"model": MODEL, "messages": USER})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    chunks = ndjson(response)
    assert len(chunks) == 9  # config.tokens chunks plus the final one
    for chunk in chunks[:-1]:
        assert set(chunk) == {"model", "created_at", "message", "done"}
        assert chunk["model"] == MODEL and chunk["done"] is False
        assert chunk["message"]["role"] == "assistant"
        assert re.fullmatch(r"[a-z]+ ", chunk["message"]["content"])
        assert chunk["created_at"].endswith("Z")
        datetime.fromisoformat(chunk["created_at"])
    final = chunks[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["eval_count"] == 8 and final["prompt_eval_count"] > 0
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0
    assert final["total_duration"] >= final["load_duration"]
    assert fake.calls[-1].tokens_sent == 8 and fake.calls[-1].status == 200


async def test_chat_non_streaming_is_the_stream_concatenated(api: httpx.AsyncClient) -> None:
    streamed = await api.post("/api/chat", json={"model": MODEL, "messages": USER})
    text = "".join(c["message"]["content"] for c in ndjson(streamed))
    response = await api.post("/api/chat", json={"model": MODEL, "messages": USER, "stream": False})
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["message"] == {"role": "assistant", "content": text}
    assert body["done"] is True and body["done_reason"] == "stop" and body["eval_count"] == 8
    # Deterministic per conversation and per model.
    assert await chat_text(api, USER) == text
    assert await chat_text(api, [{"role": "user", "content": "something else"}]) != text


async def test_generate_stream_final_has_context(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/generate", json={"model": MODEL, "prompt": "Why is the sky blue?"})
    chunks = ndjson(response)
    assert all(set(c) == {"model", "created_at", "response", "done"} for c in chunks[:-1])
    final = chunks[-1]
    assert final["response"] == "" and final["done"] is True and final["done_reason"] == "stop"
    assert isinstance(final["context"], list) and len(final["context"]) == 5 + 8
    single = await api.post(
        "/api/generate", json={"model": MODEL, "prompt": "Why is the sky blue?", "stream": False}
    )
    assert single.json()["response"] == "".join(c["response"] for c in chunks[:-1])
    raw = await api.post("/api/generate", json={"model": MODEL, "prompt": "x", "raw": True, "stream": False})
    assert "context" not in raw.json()


async def test_num_predict_cuts_with_done_reason_length(api: httpx.AsyncClient) -> None:
    full = await chat_text(api, USER)
    response = await api.post(
        "/api/chat", json={"model": MODEL, "messages": USER, "stream": False, "options": {"num_predict": 3}}
    )
    body = response.json()
    assert body["done_reason"] == "length" and body["eval_count"] == 3
    assert full.startswith(body["message"]["content"]) and len(body["message"]["content"].split()) == 3
    roomy = await api.post(
        "/api/chat", json={"model": MODEL, "messages": USER, "stream": False, "options": {"num_predict": 50}}
    )
    assert roomy.json()["done_reason"] == "stop" and roomy.json()["message"]["content"] == full


async def test_format_schema_gives_valid_json_in_several_chunks(api: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 18},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "pet": {"$ref": "#/$defs/Pet"},
            "note": {"type": "string"},
        },
        "required": ["name", "age", "ok", "tags", "pet"],
        "$defs": {
            "Pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}
        },
    }
    response = await api.post("/api/chat", json={"model": MODEL, "messages": USER, "format": schema})
    chunks = ndjson(response)
    assert len(chunks) > 5
    text = "".join(c["message"]["content"] for c in chunks)
    assert msgspec.json.decode(text) == {
        "name": "x",
        "age": 18,
        "ok": False,
        "tags": [],
        "pet": {"kind": "cat"},
    }
    generated = await api.post(
        "/api/generate", json={"model": MODEL, "prompt": "hi", "format": "json", "stream": False}
    )
    assert set(msgspec.json.decode(generated.json()["response"])) == {"text"}
    bad = await api.post("/api/generate", json={"model": MODEL, "prompt": "hi", "format": "yaml"})
    assert bad.status_code == 500 and "invalid format" in bad.json()["error"]


async def test_continuation_from_assistant_prefix(api: httpx.AsyncClient) -> None:
    full = await chat_text(api, USER)
    pieces = PIECE.findall(full)
    for k in (1, 3, len(pieces) - 1, len(pieces)):
        prefix = "".join(pieces[:k])
        response = await api.post(
            "/api/chat",
            json={
                "model": MODEL,
                "messages": [*USER, {"role": "assistant", "content": prefix}],
                "stream": False,
            },
        )
        body = response.json()
        assert prefix + body["message"]["content"] == full
        assert body.get("eval_count", 0) == len(pieces) - k and body["done_reason"] == "stop"
    # num_predict counts only the new tokens; structured output follows the same rule.
    prefix = "".join(pieces[:2])
    more = await chat_text(api, [*USER, {"role": "assistant", "content": prefix}], options={"num_predict": 2})
    assert more == "".join(pieces[2:4])
    as_json = await chat_text(api, USER, format="json")
    json_pieces = PIECE.findall(as_json)
    rest = await chat_text(
        api, [*USER, {"role": "assistant", "content": "".join(json_pieces[:4])}], format="json"
    )
    assert "".join(json_pieces[:4]) + rest == as_json


async def test_unknown_model_is_404_with_ollama_body(api: httpx.AsyncClient) -> None:
    for path, extra in (
        ("/api/chat", {"messages": USER}),
        ("/api/generate", {"prompt": "hi"}),
        ("/api/embed", {"input": "hi"}),
    ):
        response = await api.post(path, json={"model": "mistral:7b", **extra})
        assert response.status_code == 404
        assert response.json() == {"error": 'model "mistral:7b" not found, try pulling it first'}
    no_chat = await api.post("/api/chat", json={"model": "nomic-embed-text", "messages": USER})
    assert no_chat.status_code == 400 and no_chat.json() == {
        "error": '"nomic-embed-text" does not support chat'
    }


async def test_bad_requests_and_unknown_paths(api: httpx.AsyncClient) -> None:
    malformed = await api.post("/api/chat", content=b'{"model": ')
    assert malformed.status_code == 400 and "error" in malformed.json()
    empty = await api.post("/api/chat", content=b"")
    assert empty.status_code == 400 and empty.json() == {"error": "missing request body"}
    wrong_type = await api.post("/api/chat", json={"model": MODEL, "messages": USER, "stream": "yes"})
    assert wrong_type.status_code == 400 and "ChatRequest.stream of type bool" in wrong_type.json()["error"]
    missing = await api.get("/api/nothing")
    assert missing.status_code == 404 and missing.text == "404 page not found"
    assert (await api.get("/api/chat")).status_code == 405
    root = await api.get("/")
    assert root.text == "Ollama is running" and (await api.head("/")).status_code == 200
    assert (await api.get("/api/version")).json() == {"version": OLLAMA_VERSION}


# ---------------------------------------------------------------------------- embeddings


async def test_embed_is_deterministic_and_word_overlap_ranks_higher(api: httpx.AsyncClient) -> None:
    texts = ["the cat sat on the mat", "the cat sat on a rug", "quantum computing uses qubits"]
    response = await api.post("/api/embed", json={"model": "nomic-embed-text", "input": texts})
    body = response.json()
    assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    vectors = body["embeddings"]
    assert len(vectors) == 3 and all(len(v) == 64 for v in vectors)
    assert all(math.isclose(cosine(v, v), 1.0) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    again = await api.post("/api/embed", json={"model": "nomic-embed-text", "input": texts[0]})
    assert again.json()["embeddings"] == [vectors[0]]
    small = await api.post("/api/embed", json={"model": "nomic-embed-text", "input": "hi", "dimensions": 16})
    assert len(small.json()["embeddings"][0]) == 16
    legacy = await api.post("/api/embeddings", json={"model": "nomic-embed-text", "prompt": texts[0]})
    assert legacy.json() == {"embedding": vectors[0]}
    bad = await api.post("/api/embed", json={"model": "nomic-embed-text", "input": [1, 2]})
    assert bad.status_code == 400 and bad.json() == {"error": "invalid input type"}


async def test_embed_costs_per_call_and_item(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    fake.config.embed_call_cost, fake.config.embed_item_cost = 0.05, 0.02
    started = time.monotonic()
    await api.post("/api/embed", json={"model": "nomic-embed-text", "input": ["a", "b", "c"]})
    assert time.monotonic() - started >= 0.11


# ---------------------------------------------------------------------------- model lifecycle


async def test_ps_keep_alive_load_and_unload(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/ps")).json() == {"models": []}
    await chat_text(api, USER, keep_alive="10m")
    [entry] = (await api.get("/api/ps")).json()["models"]
    assert entry["name"] == MODEL and entry["size"] > 0 and entry["size_vram"] == entry["size"]
    assert entry["details"]["family"] == "llama"
    remaining = datetime.fromisoformat(entry["expires_at"]) - datetime.now(UTC)
    assert timedelta(minutes=9) < remaining <= timedelta(minutes=10)

    loaded = await api.post("/api/generate", json={"model": "qwen2.5:0.5b", "keep_alive": -1})
    assert loaded.json()["done_reason"] == "load" and loaded.json()["response"] == ""
    assert fake.loaded["qwen2.5:0.5b"] > datetime.now(UTC) + timedelta(days=365 * 100)

    unload = await api.post("/api/chat", json={"model": MODEL, "messages": [], "keep_alive": 0})
    body = unload.json()
    assert body["done_reason"] == "unload" and body["message"] == {"role": "assistant", "content": ""}
    assert [m["name"] for m in (await api.get("/api/ps")).json()["models"]] == ["qwen2.5:0.5b"]

    await chat_text(api, USER, keep_alive=0)  # generate, then unload at once
    assert MODEL not in fake.loaded
    bad = await api.post("/api/chat", json={"model": MODEL, "messages": USER, "keep_alive": "5"})
    assert bad.status_code == 400


async def test_load_delay_only_when_not_loaded(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    fake.config.load_delay = 0.15
    first = await api.post("/api/chat", json={"model": MODEL, "messages": USER, "stream": False})
    second = await api.post("/api/chat", json={"model": MODEL, "messages": USER, "stream": False})
    assert first.json()["load_duration"] >= 150_000_000
    assert second.json()["load_duration"] < 50_000_000


async def test_pull_streams_progress_then_lists_model(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    response = await api.post("/api/pull", json={"model": "gemma3:1b"})
    events = ndjson(response)
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layer = [e for e in events if e["status"].startswith("pulling ") and e["status"] != "pulling manifest"]
    assert (
        layer[0]["digest"].startswith("sha256:")
        and layer[0]["status"] == f"pulling {layer[0]['digest'][7:19]}"
    )
    assert "completed" not in layer[0] and layer[1]["completed"] < layer[1]["total"]
    assert any(e.get("completed") == e["total"] for e in layer)
    names = [m["name"] for m in (await api.get("/api/tags")).json()["models"]]
    assert names[0] == "gemma3:1b"  # most recently modified first
    assert (await api.post("/api/pull", json={"model": "x", "stream": False})).json() == {"status": "success"}

    fake.config.pullable = {"phi3:mini"}
    refused = await api.post("/api/pull", json={"model": "nope:1b", "stream": False})
    assert refused.status_code == 500 and refused.json() == {
        "error": "pull model manifest: file does not exist"
    }
    in_band = await api.post("/api/pull", json={"model": "nope:1b"})
    assert in_band.status_code == 200
    assert ndjson(in_band) == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]


async def test_create_copy_show_delete(api: httpx.AsyncClient) -> None:
    created = await api.post(
        "/api/create", json={"model": "mario", "modelfile": "FROM llama3.2:1b\nSYSTEM You are Mario."}
    )
    assert created.status_code == 200 and ndjson(created)[-1] == {"status": "success"}
    tags = (await api.get("/api/tags")).json()["models"]
    mario = next(m for m in tags if m["name"] == "mario:latest")
    assert mario["details"]["parent_model"] == MODEL and mario["details"]["family"] == "llama"
    shown = (await api.post("/api/show", json={"model": "mario"})).json()
    assert shown["system"] == "You are Mario." and "FROM " in shown["modelfile"]
    assert await chat_text(api, USER, model="mario") != ""

    modern = await api.post(
        "/api/create", json={"model": "luigi", "from": "mario", "system": "Luigi", "stream": False}
    )
    assert modern.json() == {"status": "success"}
    missing_base = await api.post(
        "/api/create", json={"model": "peach", "from": "nothing:7b", "stream": False}
    )
    assert missing_base.status_code == 500 and "error" in missing_base.json()
    no_from = await api.post("/api/create", json={"model": "peach", "modelfile": "SYSTEM hi"})
    assert no_from.status_code == 400

    assert (
        await api.post("/api/copy", json={"source": "mario", "destination": "mario-backup"})
    ).status_code == 200
    copy_missing = await api.post("/api/copy", json={"source": "bowser", "destination": "x"})
    assert copy_missing.status_code == 404
    assert (await api.request("DELETE", "/api/delete", json={"model": "mario"})).status_code == 200
    gone = await api.request("DELETE", "/api/delete", json={"model": "mario"})
    assert gone.status_code == 404 and gone.json() == {"error": "model 'mario' not found"}
    assert (await api.post("/api/show", json={"model": "mario"})).status_code == 404
    names = {m["name"] for m in (await api.get("/api/tags")).json()["models"]}
    assert {"luigi:latest", "mario-backup:latest"} <= names and "mario:latest" not in names


# ---------------------------------------------------------------------------- faults and timing


async def test_client_disconnect_during_first_token_delay(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    fake.config.first_token_delay = 3.0
    with pytest.raises(httpx.ReadTimeout):
        await api.post("/api/chat", json={"model": MODEL, "messages": USER}, timeout=0.1)
    [call] = await fake.wait_disconnected(timeout=1.0)
    assert call.disconnected_at is not None and call.disconnected_at - call.started_at < 0.5
    assert call.tokens_sent == 0 and call.first_byte_at is None
    await fake.wait_for(lambda: fake.active == 0, timeout=1.0)  # the generation stopped


async def test_client_disconnect_mid_stream_stops_generation(
    fake: FakeOllama, api: httpx.AsyncClient
) -> None:
    fake.config.token_interval = 0.05
    fake.config.tokens = 100
    async with api.stream("POST", "/api/chat", json={"model": MODEL, "messages": USER}) as response:
        async for _ in response.aiter_lines():
            break
    [call] = await fake.wait_disconnected(timeout=1.0)
    sent = call.tokens_sent
    await asyncio.sleep(0.15)
    assert 1 <= call.tokens_sent == sent < 10


async def test_disconnect_after_drops_connection_mid_stream(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    full = await chat_text(api, USER)
    fake.config.disconnect_after, fake.config.disconnect_times = 3, 1
    received: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        await read_chat_stream(api, {"model": MODEL, "messages": USER}, received)
    assert len(received) == 3
    call = next(c for c in reversed(fake.calls) if c.path == "/api/chat")
    assert call.aborted and not call.disconnected and call.tokens_sent == 3
    # disconnect_times=1: the retry succeeds and resumes exactly where the stream broke.
    prefix = "".join(received)
    assert prefix + await chat_text(api, [*USER, {"role": "assistant", "content": prefix}]) == full

    fake.config.disconnect_times = None
    with pytest.raises(httpx.RemoteProtocolError):
        await api.post("/api/chat", json={"model": MODEL, "messages": USER, "stream": False})


async def test_fail_status_and_fail_times(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    fake.config.fail_status, fake.config.fail_times = 503, 2
    for _ in range(2):
        response = await api.post("/api/chat", json={"model": MODEL, "messages": USER})
        assert response.status_code == 503
        assert response.json() == {
            "error": "server busy, please try again.  maximum pending requests exceeded"
        }
    assert (await api.post("/api/chat", json={"model": MODEL, "messages": USER})).status_code == 200
    fake.config.fail_status, fake.config.fail_times, fake.config.fail_message = 500, None, "boom"
    for path, extra in (("/api/generate", {"prompt": "hi"}), ("/api/embed", {"input": "hi"})):
        failed = await api.post(path, json={"model": MODEL, **extra})
        assert failed.status_code == 500 and failed.json() == {"error": "boom"}


async def test_error_after_reports_in_band(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    fake.config.error_after = 2
    response = await api.post("/api/generate", json={"model": MODEL, "prompt": "hi"})
    lines = ndjson(response)
    assert response.status_code == 200 and len(lines) == 3
    assert lines[-1] == {"error": "llama runner process has terminated: exit status 2"}
    fake.config.error_after = 0
    early = await api.post("/api/generate", json={"model": MODEL, "prompt": "hi"})
    assert early.status_code == 500 and "error" in early.json()


async def test_parallel_queues_extra_generations(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    fake.config.parallel = 1
    fake.config.first_token_delay = 0.1
    body = {"model": MODEL, "messages": USER, "stream": False}
    first, second = await asyncio.gather(api.post("/api/chat", json=body), api.post("/api/chat", json=body))
    assert first.status_code == second.status_code == 200
    a, b = sorted((c for c in fake.calls if c.path == "/api/chat"), key=lambda c: c.first_byte_at or 0)
    assert a.first_byte_at is not None and b.first_byte_at is not None
    assert b.first_byte_at - a.first_byte_at >= 0.09
    assert fake.active == 0


async def test_control_endpoints(fake: FakeOllama, api: httpx.AsyncClient) -> None:
    changed = await api.post("/_fake/config", json={"tokens": 3, "pullable": ["a:1b"]})
    assert changed.json()["tokens"] == 3 and fake.config.pullable == {"a:1b"}
    assert len((await chat_text(api, USER)).split()) == 3
    calls = (await api.get("/_fake/calls")).json()
    assert [c["path"] for c in calls] == ["/api/chat"] and calls[0]["tokens_sent"] == 3
    assert calls[0]["body"]["model"] == MODEL and calls[0]["finished_at"] >= calls[0]["started_at"]
    assert (await api.post("/_fake/config", json={"nope": 1})).status_code == 400
    assert (await api.post("/_fake/config", json={"tokens": "many"})).status_code == 400
    await api.post("/_fake/reset")
    assert fake.config.tokens == 8 and fake.config.pullable is None and fake.calls == []


async def test_stop_is_prompt_with_requests_in_flight() -> None:
    fake = FakeOllama(FakeConfig(first_token_delay=30))
    await fake.start()
    async with httpx.AsyncClient(base_url=fake.url, timeout=5) as http:
        await http.get("/api/version")  # leaves an idle keep-alive connection behind
        pending = asyncio.create_task(http.post("/api/chat", json={"model": MODEL, "messages": USER}))
        await fake.wait_calls(1, path="/api/chat")
        started = time.monotonic()
        await fake.stop()
        assert time.monotonic() - started < 0.5
        with pytest.raises(httpx.RemoteProtocolError):  # dropped, as Ollama's Server.Close does
            await pending
    [call] = [c for c in fake.calls if c.path == "/api/chat"]
    assert call.aborted and not call.disconnected
    with pytest.raises(RuntimeError):
        _ = fake.url


async def test_subprocess_mode(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.ollama",
        "--port",
        str(port),
        "--tokens",
        "2",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=10)
        assert line.decode().strip() == f"fake ollama listening on http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/api/version")).json() == {"version": OLLAMA_VERSION}
            reply = await http.post("/api/chat", json={"model": MODEL, "messages": USER, "stream": False})
            assert reply.json()["eval_count"] == 2
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=5)
    assert proc.returncode == 0, stderr.decode()


async def test_config_is_a_dataclass_with_documented_defaults() -> None:
    config = FakeConfig()
    assert config.tokens == 8 and config.embed_dim == 64 and config.pullable is None
    assert config.models == ["llama3.2:1b", "qwen2.5:0.5b", "qwen2.5-coder:1.5b", "nomic-embed-text:latest"]
    assert config.models is not FakeConfig().models
