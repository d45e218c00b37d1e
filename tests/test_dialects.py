"""The seeds' APIs as opt-in dialects: each seed's documented examples, replayed unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest

from services.classifier.main import Classifier
from services.edge.app import create_app
from services.edge.dialects import DialectConflict
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.seed_curl import request


@asynccontextmanager
async def seed_edge(settings: Settings, dialects: str, **more: object) -> AsyncIterator[httpx.AsyncClient]:
    edge = Edge(msgspec.structs.replace(settings, dialects=dialects.split(","), **more))
    async with edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        yield http


async def replay(http: httpx.AsyncClient, command: str) -> httpx.Response:
    return await http.send(request(command, str(http.base_url).rstrip("/")))


def data_lines(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def test_dialects_are_off_by_default_and_two_claiming_one_path_refuse_to_start() -> None:
    app = create_app(Settings())
    assert "/api/v1/generate" not in app.route_handler_method_map
    with pytest.raises(DialectConflict, match="'badges' and 'simple' both claim POST /api/v1/generate"):
        create_app(Settings(dialects=["badges", "simple"]))
    with pytest.raises(DialectConflict, match="unknown dialect 'nope'"):
        create_app(Settings(dialects=["nope"]))


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


# --- seed 001: the router ----------------------------------------------------------------------


async def test_router_seed_complete_streams_the_seed_messages_naming_the_chosen_model(
    settings: Settings, generator: object, fake_ollama: FakeOllama
) -> None:
    classifier = Classifier(settings)
    await classifier.start()
    try:
        async with seed_edge(settings, "router") as http:
            response = await http.post("/complete", json={"message": "Your prompt here"})
    finally:
        await classifier.stop(grace=0)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in data_lines(response.text)]
    assert lines and all(set(line) == {"message", "timestamp", "user_id", "model"} for line in lines)
    assert {line["model"] for line in lines} == {"llama3.2:1b"}  # the default route's, not "auto"
    assert "".join(line["message"] for line in lines) and lines[0]["timestamp"].endswith("Z")


# --- seed 002: the queued streaming API --------------------------------------------------------

QUEUED_JOB = {
    "prompt": "What is knowledge distillation?",
    "context": "Knowledge distillation is a process in machine learning where a compact model, the student, "
    "is trained to reproduce the behavior of a larger, pre-trained model, the teacher.",
    "client_id": "some-unique-client-identifier",
}


async def test_queued_seed_streams_several_jobs_over_one_client_stream_in_submit_order(
    settings: Settings, generator: object, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.token_interval = 0.01
    async with (
        seed_edge(settings, "queued") as http,
        http.stream("GET", "/api/v1/chat/stream/some-unique-client-identifier") as stream,
    ):
        assert stream.status_code == 200
        lines = stream.aiter_lines()
        assert await anext(lines) == ": connected"  # registered: now the submits
        ids = []
        for n in range(3):
            submitted = await http.post("/api/v1/chat/submit", json={**QUEUED_JOB, "prompt": f"question {n}"})
            assert submitted.status_code == 200, submitted.text
            ids.append(submitted.json()["request_id"])
        events = []
        async for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if sum("done" in e for e in events) == 3:
                    break
        unknown = await http.post("/api/v1/chat/submit", json={**QUEUED_JOB, "client_id": "nobody"})
        assert unknown.status_code == 404 and "open GET /api/v1/chat/stream" in unknown.text
    ends = [e["request_id"] for e in events if "done" in e]
    assert ends == ids  # FIFO: each job whole, in submit order
    per_job = [i for i, e in enumerate(events) if "done" in e]
    assert per_job == [8, 17, 26]  # 8 tokens, then its end, for every job: no interleaving


async def test_queued_seed_disconnect_cancels_the_running_job(
    settings: Settings, generator: object, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.token_interval = 0.2
    async with seed_edge(settings, "queued") as http:
        async with http.stream("GET", "/api/v1/chat/stream/c1") as stream:
            lines = stream.aiter_lines()
            await anext(lines)
            await http.post("/api/v1/chat/submit", json={**QUEUED_JOB, "client_id": "c1"})
            async for line in lines:
                if line.startswith("data: "):
                    break  # the first token: the job runs; now hang up
        [call] = await fake_ollama.wait_disconnected()
        assert call.path == "/api/generate"
