"""Routing (`"model": "auto"` / `"route:NAME"`) and classification, end to end.

HTTP edge -> real NATS -> classifier -> generator -> fake Ollama. The fake's embeddings are a
hashed bag of words, so texts that share words are closer: each test's prompt is written to share
words with the examples of the route it expects.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest

from contracts import subjects
from contracts.models import ModelInfo
from contracts.route import CLASSIFY_SUBJECT
from services.classifier.main import Classifier
from services.classifier.routes import RoutesError, parse
from services.classifier.rules import has_code
from services.runtime.inventory import encode_info, open_bucket
from services.runtime.settings import Settings
from tests.fakes.ollama import FakeOllama
from tests.sse import SseEvent, collect

ROUTES = """
[router]
default = "chat"
threshold = 0.3
top_k = 2
embed_model = "nomic-embed-text"

[[route]]
name = "code"
model = "qwen2.5-coder:1.5b"
fallbacks = ["llama3.2:1b"]
rules = [{ code = true }, { keywords = ["python"] }]
examples = ["write a function that sorts a list", "fix the bug in my function"]

[[route]]
name = "math"
model = "qwen2.5:0.5b"
examples = ["what is the sum of two numbers", "solve the equation for x"]

[[route]]
name = "summarise"
model = "llama3.2:3b"
fallbacks = ["llama3.2:1b"]
rules = [{ keywords = ["summarise"] }]
examples = ["give me the key points of this article", "shorten this text"]

[[route]]
name = "chat"
model = "llama3.2:1b"
examples = ["hello how are you today", "tell me a joke"]
"""


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.toml"
    rewrite(path, ROUTES)
    return path


@pytest.fixture
def settings(settings: Settings, routes_file: Path, fake_ollama: FakeOllama) -> Settings:
    fake_ollama.config.embed_dim = 256  # fewer hash collisions than the default 64
    return msgspec.structs.replace(settings, routes_file=str(routes_file), route_wait_s=0.5)


@pytest.fixture
async def classifier(settings: Settings) -> AsyncIterator[Classifier]:
    service = Classifier(settings)
    await service.start()
    yield service
    await service.stop(grace=0)


def rewrite(path: Path, text: str) -> None:
    path.write_text(text)


def chat(text: str, model: str = "auto", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def stream(client: httpx.AsyncClient, body: dict[str, Any]) -> list[SseEvent]:
    async with client.stream("POST", "/v1/chat", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return await collect(response)


def generated_models(fake: FakeOllama) -> list[str]:
    return [c.body["model"] for c in fake.calls if c.path == "/api/chat" and "format" not in c.body]


def routed_of(events: list[SseEvent]) -> dict[str, Any]:
    [routed] = [e.data for e in events if e.event == "routed"]
    return routed


# -- routing ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("classifier")
async def test_auto_streams_start_routed_tokens_done_in_one_numbered_stream(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    events = await stream(client, chat("```\nprint(1)\n```\nwhat does this print?"))

    assert [e.event for e in events] == ["start", "routed", *["token"] * 8, "done"]
    assert [e.id for e in events] == [str(i) for i in range(len(events))]
    routed = routed_of(events)
    assert routed["route"] == "code" and routed["method"] == "rule" and routed["score"] == 1.0
    assert "code" in routed["why"]
    assert events[0].data["model"] == routed["model"] == "qwen2.5-coder:1.5b"
    assert generated_models(fake_ollama) == ["qwen2.5-coder:1.5b"]


@pytest.mark.usefixtures("classifier")
async def test_compat_streams_name_the_routed_model(client: httpx.AsyncClient) -> None:
    body = chat("```\nprint(1)\n```\nwhat does this print?", stream=True)
    async with client.stream("POST", "/openai/v1/chat/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
    assert {json.loads(line[6:])["model"] for line in lines} == {"qwen2.5-coder:1.5b"}
    async with client.stream("POST", "/ollama/api/chat", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line]
    assert {json.loads(line)["model"] for line in lines} == {"qwen2.5-coder:1.5b"}


@pytest.mark.usefixtures("classifier")
async def test_rule_keywords_route_without_embedding(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    embeds_before = sum(c.path == "/api/embed" for c in fake_ollama.calls)
    events = await stream(client, chat("How do I read a file in Python?"))
    routed = routed_of(events)
    assert (routed["route"], routed["method"]) == ("code", "rule")
    assert "'Python'" in routed["why"]
    assert sum(c.path == "/api/embed" for c in fake_ollama.calls) == embeds_before


@pytest.mark.usefixtures("classifier")
async def test_similarity_picks_the_route_with_the_closest_examples(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat", json=chat("what is the sum of these two numbers"))
    assert response.status_code == 200
    answer = response.json()
    assert answer["model"] == "qwen2.5:0.5b"
    routed = answer["routed"]
    assert (routed["route"], routed["method"]) == ("math", "similarity")
    assert routed["score"] >= 0.3
    assert routed["why"].startswith("closest examples: math")


@pytest.mark.usefixtures("classifier")
async def test_below_the_threshold_the_default_route_applies(client: httpx.AsyncClient) -> None:
    events = await stream(client, chat("zebra quantum marmalade"))
    routed = routed_of(events)
    assert (routed["route"], routed["method"], routed["model"]) == ("chat", "default", "llama3.2:1b")
    assert routed["score"] < 0.3
    assert "below its threshold" in routed["why"]
    assert events[-1].event == "done"


@pytest.mark.usefixtures("classifier")
async def test_an_embedding_failure_degrades_to_the_default_route(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.fail_status, fake_ollama.config.fail_times = 500, 1  # the prompt's embedding
    events = await stream(client, chat("what is the sum of these two numbers"))
    routed = routed_of(events)
    assert (routed["route"], routed["method"]) == ("chat", "default")
    assert routed["why"].startswith("no embedding of the prompt")
    assert events[-1].event == "done"


@pytest.mark.usefixtures("classifier")
async def test_llm_judge_settles_close_routes_with_a_constrained_answer(
    client: httpx.AsyncClient, fake_ollama: FakeOllama, routes_file: Path
) -> None:
    # Every route is "close" (margin 2 covers any cosine), so the judge decides. The fake answers
    # a schema's first enum value: `code`, the first route in file order, although `math` has
    # the closest examples: the routed model is the judge's choice, not similarity's.
    rewrite(
        routes_file,
        ROUTES.replace("top_k = 2\n", 'top_k = 2\njudge_model = "llama3.2:1b"\njudge_margin = 2.0\n').replace(
            "threshold = 0.3", "threshold = -1.0"
        ),
    )
    events = await stream(client, chat("what is the sum of these two numbers"))

    routed = routed_of(events)
    assert (routed["route"], routed["method"], routed["model"]) == ("code", "judge", "qwen2.5-coder:1.5b")
    assert routed["why"].startswith("llama3.2:1b chose among close routes: math")
    [judge_call] = [c for c in fake_ollama.calls if c.path == "/api/chat" and "format" in c.body]
    assert judge_call.body["model"] == "llama3.2:1b"
    assert judge_call.body["format"]["properties"]["route"]["enum"] == ["code", "math", "summarise", "chat"]


@pytest.mark.usefixtures("classifier")
async def test_a_named_route_falls_back_when_its_model_is_not_available(client: httpx.AsyncClient) -> None:
    events = await stream(client, chat("anything at all", model="route:summarise"))
    routed = routed_of(events)
    assert (routed["route"], routed["method"]) == ("summarise", "named")
    # llama3.2:3b is not on the backend: the route's first fallback serves it.
    assert routed["model"] == "llama3.2:1b" and routed["fallback_from"] == "llama3.2:3b"
    assert events[0].data["model"] == "llama3.2:1b"


async def test_a_route_whose_model_disappears_uses_its_fallback(
    settings: Settings, client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.models.remove("qwen2.5-coder:1.5b")
    service = Classifier(settings)
    await service.start()
    try:
        events = await stream(client, chat("```\nx = 1\n```"))
    finally:
        await service.stop(grace=0)
    routed = routed_of(events)
    assert (routed["route"], routed["model"], routed["fallback_from"]) == (
        "code",
        "llama3.2:1b",
        "qwen2.5-coder:1.5b",
    )
    assert "qwen2.5-coder:1.5b is not available" in routed["why"]
    assert events[-1].event == "done"


@pytest.mark.usefixtures("classifier")
async def test_the_janitors_inventory_decides_which_models_are_available(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        kv = await open_bucket(nc.jetstream())
        # The backend has qwen2.5-coder, but no janitor lists it as ready.
        for info in [
            ModelInfo(host="h1", model="llama3.2:1b", state="available"),
            ModelInfo(host="h1", model="qwen2.5-coder:1.5b", state="pulling"),
        ]:
            await kv.put(subjects.inventory_key("h1", info.model), encode_info(info))
        for _ in range(100):  # the classifier's watch applies the entries
            events = await stream(client, chat("```\nx = 1\n```"))
            if routed_of(events)["model"] == "llama3.2:1b":
                break
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
    assert routed_of(events)["fallback_from"] == "qwen2.5-coder:1.5b"


@pytest.mark.usefixtures("classifier")
async def test_an_unknown_route_is_a_bad_request(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat", json=chat("hi", model="route:nope"))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "bad_request" and "unknown route 'nope'" in error["message"]


@pytest.mark.usefixtures("classifier")
async def test_routes_file_changes_apply_without_a_restart(
    client: httpx.AsyncClient, routes_file: Path
) -> None:
    body = chat("```\nx = 1\n```")
    assert routed_of(await stream(client, body))["model"] == "qwen2.5-coder:1.5b"

    rewrite(routes_file, ROUTES.replace('model = "qwen2.5-coder:1.5b"', 'model = "qwen2.5:0.5b"'))
    assert routed_of(await stream(client, body))["model"] == "qwen2.5:0.5b"

    rewrite(routes_file, "[router]\ndefault = 'missing'\n")  # broken: the last good routes stay
    assert routed_of(await stream(client, body))["model"] == "qwen2.5:0.5b"


async def test_without_a_classifier_the_edge_uses_the_default_model_after_its_bound(
    settings: Settings, client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    events = await stream(client, chat("```\nx = 1\n```"))

    assert [e.event for e in events] == ["start", "routed", *["token"] * 8, "done"]
    assert [e.id for e in events] == [str(i) for i in range(len(events))]
    routed = routed_of(events)
    assert (routed["route"], routed["method"], routed["model"]) == ("chat", "edge_fallback", "llama3.2:1b")
    assert "within 0.5 s" in routed["why"]
    assert generated_models(fake_ollama) == ["llama3.2:1b"]
    # The routing message was taken off the queue: a classifier that starts later never runs it.
    nc = await nats.connect(settings.nats_url)
    try:
        info = await nc.jetstream().stream_info(subjects.REQUEST_STREAM)
    finally:
        await nc.close()
    assert info.state.messages == 0


async def test_a_slow_classifier_loses_to_the_edge_fallback_and_routes_nothing(
    settings: Settings, client: httpx.AsyncClient, fake_ollama: FakeOllama, classifier: Classifier
) -> None:
    fake_ollama.config.embed_call_cost = 1.0  # embedding the prompt outlasts the edge's 0.5 s
    nc = await nats.connect(settings.nats_url)
    try:
        response = await client.post("/v1/chat", json=chat("tell me something"))
        request_id = response.headers["x-request-id"]
        late = await nc.subscribe(subjects.event_subject(request_id))
        for _ in range(200):  # until the classifier has finished with it
            if classifier.worker.in_flight == 0 and any(c.path == "/api/embed" for c in fake_ollama.calls):
                break
            await asyncio.sleep(0.01)
        await nc.flush()
        assert late.pending_msgs == 0  # it published nothing: no second start or routed
    finally:
        await nc.close()
    answer = response.json()
    assert answer["routed"]["method"] == "edge_fallback"
    assert generated_models(fake_ollama) == ["llama3.2:1b"]


# -- classification -----------------------------------------------------------------------------


LABELS = ["weather forecast rain", "football match score", "stock market prices"]


@pytest.mark.usefixtures("classifier")
async def test_classify_by_embedding_scores_every_label(client: httpx.AsyncClient) -> None:
    body = {"text": "will it rain tomorrow, what is the forecast", "labels": LABELS}
    response = await client.post("/v1/classify", json=body)
    assert response.status_code == 200
    reply = response.json()
    assert reply["label"] == "weather forecast rain"
    assert reply["method"] == "embedding" and reply["model"] == "nomic-embed-text"
    scores = [item["score"] for item in reply["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert {item["label"] for item in reply["labels"]} == set(LABELS)
    assert sum(scores) == pytest.approx(1.0, abs=1e-3)
    # One embedding call for the text and the labels: its tokens, none for generation.
    assert reply["usage"]["prompt_tokens"] > 0 and reply["usage"]["completion_tokens"] == 0
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"]

    multi = (await client.post("/v1/classify", json={**body, "multi_label": True})).json()
    assert multi["label"] == "weather forecast rain" and multi["multi_label"] is True
    assert all(0.0 <= item["score"] <= 1.0 for item in multi["labels"])
    # The labels are embedded once and kept: now only the text costs tokens.
    assert 0 < multi["usage"]["prompt_tokens"] < reply["usage"]["prompt_tokens"]


@pytest.mark.usefixtures("classifier")
async def test_classify_by_llm_asks_for_json_constrained_to_the_labels(
    client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    body = {"text": "the striker scored twice", "labels": LABELS, "method": "llm"}
    reply = (await client.post("/v1/classify", json=body)).json()
    # The fake answers a schema's first enum value.
    assert reply["label"] == LABELS[0] and reply["labels"][0] == {"label": LABELS[0], "score": 1.0}
    assert [c.body["format"] for c in fake_ollama.calls if c.path == "/api/chat"][-1]["properties"]["label"][
        "enum"
    ] == LABELS
    usage = reply["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    multi = (await client.post("/v1/classify", json={**body, "multi_label": True})).json()
    assert [c.body["format"] for c in fake_ollama.calls if c.path == "/api/chat"][-1]["required"] == LABELS
    assert all(item["score"] == 0.0 for item in multi["labels"])  # the fake answers false for each


@pytest.mark.usefixtures("classifier")
@pytest.mark.parametrize(
    "body",
    [
        {"text": "x", "labels": []},
        {"text": "x", "labels": ["a", "a"]},
        {"text": "   ", "labels": ["a"]},
        {"text": "x", "labels": ["a"], "method": "magic"},
        {"text": "x", "labels": ["a"], "unknown": 1},
        {"labels": ["a"]},
    ],
)
async def test_classify_refuses_bad_input(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await client.post("/v1/classify", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


@pytest.mark.usefixtures("classifier")
async def test_classify_over_nats_request_reply(settings: Settings) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        ok = await nc.request(
            CLASSIFY_SUBJECT, json.dumps({"text": "the match score", "labels": LABELS}).encode(), timeout=5
        )
        bad = await nc.request(CLASSIFY_SUBJECT, b'{"text": "x"}', timeout=5)
    finally:
        await nc.close()
    assert json.loads(ok.data)["label"] == "football match score"
    assert bad.headers is not None and bad.headers["Nats-Service-Error-Code"] == "400"
    assert json.loads(bad.data)["error"]["code"] == "bad_request"


async def test_classify_without_a_classifier_is_backend_unavailable(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/classify", json={"text": "x", "labels": ["a"]})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "backend_unavailable"


# -- the routes file and rules, without a bus ---------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t.replace('default = "chat"', 'default = "nope"'), "names no route"),
        (lambda t: t.replace('name = "math"', 'name = "code"'), "duplicate route 'code'"),
        (lambda t: t + "\n[[route]]\nname = 'x'\nmodel = 'm'\n", "neither examples nor rules"),
        (lambda t: t.replace("top_k = 2", "top_k = 2\ncolour = 1"), "colour"),
        (lambda t: t.replace('model = "qwen2.5:0.5b"', 'model = "bad model"'), "invalid model name"),
        (lambda t: t.replace("[[route]]", "[[route", 1), "routes"),
    ],
)
def test_a_bad_routes_file_is_refused_with_the_reason(edit: Any, problem: str) -> None:
    with pytest.raises(RoutesError, match=problem):
        parse(edit(ROUTES))


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("```\nanything\n```", True),
        ("def add(a, b):\n    return a - b\nwhy -1?", True),
        ("what does `xs[i] *= 2` do", True),
        ("int main() {\n  return 0;\n}", True),
        ("What is f(x) = 2x?", False),
        ("public transport is great; trains are fast", False),
        ("I want to import data from a spreadsheet", False),
    ],
)
def test_code_presence(text: str, code: bool) -> None:
    assert has_code(text) is code


async def test_without_a_classifier_the_edge_fallback_walks_the_default_routes_fallbacks(
    settings: Settings, routes_file: Path, client: httpx.AsyncClient, fake_ollama: FakeOllama
) -> None:
    # The default route's model is not on the backend: the edge takes its first fallback that is,
    # as the classifier would, instead of sending the request to a missing model.
    rewrite(
        routes_file,
        ROUTES.replace(
            'model = "llama3.2:1b"\nexamples',
            'model = "llama3.2:3b"\nfallbacks = ["gemma3:270m", "qwen2.5:0.5b"]\nexamples',
        ),
    )
    events = await stream(client, chat("hello there"))

    assert events[-1].event == "done", events[-1].data
    routed = routed_of(events)
    assert (routed["route"], routed["method"], routed["model"]) == ("chat", "edge_fallback", "qwen2.5:0.5b")
    assert "llama3.2:3b is not available" in routed["why"]
    assert generated_models(fake_ollama) == ["qwen2.5:0.5b"]


async def test_a_routed_requests_log_line_and_metrics_name_the_model_that_answered_and_the_route(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmbus.edge")
    events = await stream(client, chat("hello there"))  # no classifier: the edge's fallback routes it
    assert events[-1].event == "done"

    [line] = [r for r in caplog.records if r.getMessage() == "request finished"]
    assert (getattr(line, "model", None), getattr(line, "route", None)) == ("llama3.2:1b", "chat")
    text = (await client.get("/metrics")).text
    assert 'endpoint="/v1/chat",model="llama3.2:1b"' in text.replace(" ", "")
    assert 'model="auto"' not in text
