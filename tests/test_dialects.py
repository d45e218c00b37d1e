"""The seeds' APIs as opt-in dialects: each seed's documented examples, replayed unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest

from services.edge.app import create_app
from services.edge.dialects import DialectConflict
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.seed_curl import request


@asynccontextmanager
async def seed_edge(settings: Settings, dialects: str, **more: object) -> AsyncIterator[httpx.AsyncClient]:
    async with Edge(msgspec.structs.replace(settings, dialects=dialects, **more)) as edge:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
            yield http


async def replay(http: httpx.AsyncClient, command: str) -> httpx.Response:
    return await http.send(request(command, str(http.base_url).rstrip("/")))


def data_lines(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_dialects_are_off_by_default_and_two_claiming_one_path_refuse_to_start() -> None:
    app = create_app(Settings())
    assert "/api/v1/generate" not in app.route_handler_method_map
    with pytest.raises(DialectConflict, match="'badges' and 'simple' both claim POST /api/v1/generate"):
        create_app(Settings(dialects="badges,simple"))
    with pytest.raises(DialectConflict, match="unknown dialect 'nope'"):
        create_app(Settings(dialects="nope"))


# --- seed 004: the simple generate API ---------------------------------------------------------

SIMPLE_PLAIN = """curl -X POST "http://127.0.0.1:8000/api/v1/generate" \\
-H "Content-Type: application/json" \\
-d '{"prompt": "Why is the sky blue?"}'"""

SIMPLE_STREAM = """curl -X POST "http://127.0.0.1:8000/api/v1/generate" \\
-H "Content-Type: application/json" \\
-d '{"prompt": "Write a short story about a robot.", "stream": true}' -N"""


async def test_simple_seed_examples_answer_with_the_server_default_model(
    settings: Settings, generator: object, fake_ollama: FakeOllama
) -> None:
    async with seed_edge(settings, "simple", default_model="qwen2.5:0.5b") as http:
        plain = await replay(http, SIMPLE_PLAIN)
        assert plain.status_code == 200, plain.text
        assert set(plain.json()) == {"response"} and plain.json()["response"]

        stream = await replay(http, SIMPLE_STREAM)
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        lines = [json.loads(line) for line in data_lines(stream.text)]
        assert lines[-1] == {} and all(set(line) == {"response"} for line in lines[:-1])
        assert len(lines) > 2 and "".join(line["response"] for line in lines[:-1])
    assert {call.body["model"] for call in fake_ollama.calls if call.path == "/api/generate"} == {
        "qwen2.5:0.5b"
    }


# --- seed 000: badges --------------------------------------------------------------------------

BADGES_HEALTH = "curl http://localhost:8001/api/v1/health"

BADGES_PLAIN = """curl -X POST http://localhost:8001/api/v1/generate \\
  -H "Content-Type: application/json" \\
  -d '{"content": "Python programming course"}'"""

BADGES_STREAM = """curl -X POST http://localhost:8001/api/v1/generate/stream \\
  -H "Content-Type: application/json" \\
  -d '{"content": "Python programming course"}'"""

BADGES_KNOBS = {
    "content": "Course content here...",
    "temperature": 0.2,
    "max_tokens": 1024,
    "top_p": 0.8,
    "top_k": 30,
    "repeat_penalty": 1.02,
}


async def test_badges_seed_examples_answer_with_the_seed_shapes(
    settings: Settings, generator: object, fake_ollama: FakeOllama
) -> None:
    async with seed_edge(settings, "badges") as http:
        health = await replay(http, BADGES_HEALTH)
        assert health.status_code == 200 and health.json()["status"] == "healthy"

        plain = await replay(http, BADGES_PLAIN)
        assert plain.status_code == 200, plain.text
        body = plain.json()
        assert {"badge_name", "badge_description", "criteria"} <= set(body["response"])
        assert body["response"]["criteria"]["narrative"] and body["model"]
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}

        stream = await replay(http, BADGES_STREAM)
        assert stream.status_code == 200, stream.text
        events = [json.loads(line) for line in data_lines(stream.text)]
        tokens, final = events[:-1], events[-1]
        assert tokens and all(e["type"] == "token" and e["done"] is False for e in tokens)
        assert tokens[-1]["accumulated"] == "".join(e["content"] for e in tokens)
        assert final["type"] == "final" and final["content"]["badge_name"] and final["usage"]["total_tokens"]

        knobs = await http.post("/api/v1/generate", json=BADGES_KNOBS)
        assert knobs.status_code == 200, knobs.text
        assert (await http.get("/docs")).status_code in (200, 302)
    options = [call.body["options"] for call in fake_ollama.calls if call.path == "/api/chat"][-1]
    assert options["num_predict"] == 1024 and options["top_k"] == 30 and options["repeat_penalty"] == 1.02
