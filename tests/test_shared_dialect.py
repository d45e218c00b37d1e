"""Seed 003 (the shared multi-tenant Ollama service) as the `shared` dialect: its README's own
examples replayed unchanged, its error codes and headers, and images shrunk at the edge."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
from PIL import Image

from contracts import ErrorCode, GenerateRequest, LlmbusError, Message, subjects
from contracts.models import UsageEvent
from services.batcher.main import BatcherService
from services.edge.app import create_app
from services.edge.dialects import DialectConflict
from services.edge.images import ImagePolicy, shrink
from services.embedder.main import Embedder
from services.generator.main import Generator
from services.ledger.store import database_url
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import DEFAULT_MODELS, FakeOllama
from tests.sse import sse_events
from tests.test_admission import bearer, with_auth
from tests.test_dialects import data_lines, replay, seed_edge
from tests.test_janitor import janitor
from tests.test_ledger import ledger

TEXT_MODEL = "qwen3:14b-q4_K_M"  # the seed's models, served by the fake Ollama under their names
VLM_MODEL = "qwen3-vl:8b-instruct-q4_K_M"

# --- the README's quickstart, verbatim (only the host changes) ---------------------------------

HEALTH = "curl http://0.0.0.0:8000/api/v1/health"
MODELS = "curl http://0.0.0.0:8000/api/v1/models"
PROFILE = "curl http://0.0.0.0:8000/api/v1/system/model-profile"
CHAT = """curl -X POST http://0.0.0.0:8000/api/v1/chat \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "qwen3:14b-q4_K_M",
    "messages": [
      {"role": "user", "content": "Explain quantum computing in one sentence"}
    ]
  }'"""
CHAT_OPENAI = """curl -X POST http://0.0.0.0:8000/api/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "qwen3:14b-q4_K_M",
    "messages": [
      {"role": "user", "content": "Explain quantum computing in one sentence"}
    ]
  }'"""
VLM = """curl -X POST http://0.0.0.0:8000/api/v1/vlm \\
  -H "Content-Type: application/json" \\
  -d "{
    \\"model\\": \\"qwen3-vl:8b-instruct-q4_K_M\\",
    \\"messages\\": [{\\"role\\": \\"user\\", \\"content\\": \\"What's in this image?\\"}],
    \\"images\\": [\\"$IMAGE_DATA\\"]
  }\""""
EMBEDDINGS = """curl -X POST http://0.0.0.0:8000/api/v1/embeddings \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "qwen3:14b-q4_K_M",
    "prompt": "What is machine learning?"
  }'"""
PS = "curl http://0.0.0.0:8000/api/v1/models/ps"
SHOW = "curl http://0.0.0.0:8000/api/v1/models/qwen3:14b-q4_K_M/show"
CREATE = """curl -X POST http://0.0.0.0:8000/api/v1/models/create \\
  -H "Content-Type: application/json" \\
  -d '{
    "name": "custom-model",
    "modelfile": "FROM qwen3:14b-q4_K_M\\nSYSTEM \\"You are a helpful assistant.\\""
  }'"""


def photo(width: int, height: int) -> bytes:
    """A JPEG with a photo's noise (what makes real photos large), made here."""
    noise = Image.effect_noise((width, height), 60)
    img = Image.merge("RGB", (noise, noise.rotate(180), Image.linear_gradient("L").resize((width, height))))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95)
    return out.getvalue()


def image_data(jpeg: bytes) -> str:
    """The README's `IMAGE_DATA=$(python3 -c "... 'data:image/jpeg;base64,' + b64encode(...)")`."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Room for photos: the seed took 1.5 MiB bodies (every service here provisions the streams)."""
    return msgspec.structs.replace(settings, max_body_bytes=4_000_000)


@pytest.fixture
def seed_models(fake_ollama: FakeOllama) -> FakeOllama:
    fake_ollama.config.models = [*DEFAULT_MODELS, TEXT_MODEL, VLM_MODEL]
    return fake_ollama


@pytest.fixture
async def embedder(settings: Settings) -> AsyncIterator[Embedder]:
    service = Embedder(settings)
    await service.start()
    yield service
    await service.stop(grace=0)


def _request_id(response: httpx.Response) -> str:
    rid = response.headers["X-Shared-Ollama-Request-Id"]
    assert rid and response.headers["X-Request-ID"] == rid  # the seed's header and llmbus's
    return rid


async def test_the_seed_quickstart_runs_unchanged(
    settings: Settings, generator: object, embedder: Embedder, seed_models: FakeOllama
) -> None:
    async with seed_edge(settings, "shared") as http:
        health = await replay(http, HEALTH)
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "healthy" and health.json()["ollama_status"] == "running"

        chat = await replay(http, CHAT)
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["message"]["role"] == "assistant" and body["message"]["content"]
        assert body["model"] == TEXT_MODEL and body["request_id"] == _request_id(chat)
        assert body["generation_eval_count"] == 8 and body["latency_ms"] > 0

        openai = await replay(http, CHAT_OPENAI)
        assert openai.status_code == 200, openai.text
        assert openai.json()["object"] == "chat.completion"
        assert openai.json()["choices"][0]["message"]["content"]

        jpeg = photo(800, 600)
        vlm = await replay(http, VLM.replace("$IMAGE_DATA", image_data(jpeg)))
        assert vlm.status_code == 200, vlm.text
        assert vlm.json()["message"]["content"] and vlm.json()["images_processed"] == 1

        embedded = await replay(http, EMBEDDINGS)
        assert embedded.status_code == 200, embedded.text
        assert set(embedded.json()) == {"embedding", "model", "prompt", "latency_ms"}
        assert (
            len(embedded.json()["embedding"]) == 64
            and embedded.json()["prompt"] == "What is machine learning?"
        )

        profile = await replay(http, PROFILE)  # the quickstart's third check: no llmbus counterpart
        assert profile.status_code == 501 and profile.json()["code"] == "not_implemented"
        assert "hardware model profile" in profile.json()["error"]
        docs = await http.get("/api/docs")  # "Open in your browser: http://0.0.0.0:8000/api/docs"
        assert docs.status_code in (301, 302, 307) and docs.headers["location"] == "/schema/swagger"
    [sent] = [c.body for c in seed_models.calls if c.path == "/api/chat" and c.body["model"] == VLM_MODEL]
    assert base64.b64decode(sent["messages"][-1]["images"][0]) == jpeg  # compression off: as sent


async def test_the_readme_python_vlm_snippet_and_streams(
    settings: Settings, generator: object, seed_models: FakeOllama
) -> None:
    img_data = base64.b64encode(photo(320, 240)).decode()
    async with seed_edge(settings, "shared") as http:
        response = await http.post(  # the README's `requests.post(...)`, as httpx
            "/api/v1/vlm",
            json={
                "model": "qwen3-vl:8b-instruct-q4_K_M",
                "messages": [{"role": "user", "content": "What's in this image?"}],
                "images": [f"data:image/jpeg;base64,{img_data}"],
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["message"]["content"]

        streamed = await http.post(
            "/api/v1/chat",
            json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "model": TEXT_MODEL},
        )
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith(
            "text/event-stream"
        )
        chunks = [json.loads(line) for line in data_lines(streamed.text)]
        assert all(c["role"] == "assistant" and c["request_id"] == _request_id(streamed) for c in chunks)
        assert [c["done"] for c in chunks] == [False] * 8 + [True]
        assert chunks[-1]["generation_eval_count"] == 8 and "".join(c["chunk"] for c in chunks)

        generated = await http.post(
            "/api/v1/generate", json={"prompt": "Explain quantum computing", "model": TEXT_MODEL}
        )
        assert generated.status_code == 200 and generated.json()["text"]

        vision_openai = await http.post(
            "/api/v1/vlm/openai",
            json={
                "model": VLM_MODEL,
                "stream": True,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What's in this image?"},
                            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{img_data}"}},
                        ],
                    }
                ],
            },
        )
        lines = data_lines(vision_openai.text)
        assert vision_openai.status_code == 200 and lines[-1] == "[DONE]"
        assert json.loads(lines[0])["object"] == "chat.completion.chunk"


async def test_models_list_ps_show_create_and_copy_go_through_the_janitor(
    settings: Settings, seed_models: FakeOllama, tmp_path: Path
) -> None:
    warm = f'[[models]]\nname = "{TEXT_MODEL}"\nwarm = true\n'
    async with janitor(settings, tmp_path, warm), seed_edge(settings, "shared") as http:
        async with asyncio.timeout(5):
            while not (await replay(http, PS)).json()["models"]:
                await asyncio.sleep(0.05)
        listed = (await replay(http, MODELS)).json()["models"]
        [entry] = [m for m in listed if m["name"] == TEXT_MODEL.lower()]  # names as llmbus lists them
        assert set(entry) == {"name", "size", "modified_at"} and entry["size"] > 0
        [running] = (await replay(http, PS)).json()["models"]
        assert running["name"] == TEXT_MODEL.lower() and running["size_vram"]

        shown = await replay(http, SHOW)
        assert shown.status_code == 200 and shown.json()["details"]["family"], shown.text

        created = await replay(http, CREATE)
        assert created.status_code == 200 and created.json() == {"status": "success"}, created.text
        copied = await http.post("/api/v1/models/custom-model/copy", json={"destination": "custom-copy"})
        assert copied.status_code == 200, copied.text
        assert copied.json() == {
            "status": "success",
            "source": "custom-model",
            "destination": "custom-copy:latest",
        }
    [create] = [c.body for c in seed_models.calls if c.path == "/api/create"]
    assert create["model"] == "custom-model:latest" and create["system"] == "You are a helpful assistant."
    [copy] = [c.body for c in seed_models.calls if c.path == "/api/copy"]
    assert copy["source"].startswith("custom-model") and copy["destination"].startswith("custom-copy")


async def test_x_project_name_is_the_tenant_the_ledger_records_with_auth_off(
    settings: Settings, generator: object, seed_models: FakeOllama
) -> None:
    nc = await nats.connect(settings.nats_url)
    usage = await nc.subscribe(subjects.USAGE_SUBJECTS)
    async with seed_edge(settings, "shared", default_model=TEXT_MODEL) as http:
        # API_REFERENCE's example: `-H "X-Project-Name: MyProject"`
        answered = await http.post(
            "/api/v1/generate", json={"prompt": "hi"}, headers={"X-Project-Name": "MyProject"}
        )
        refused = await http.post(
            "/api/v1/generate", json={"prompt": "hi"}, headers={"X-Project-Name": "a b"}
        )
        try:
            event = msgspec.json.decode((await usage.next_msg(timeout=5)).data, type=UsageEvent)
        finally:
            await nc.close()
    assert answered.status_code == 200 and refused.status_code == 400, refused.text
    assert (event.tenant, event.api, event.request_id) == (
        "MyProject",
        "shared",
        answered.json()["request_id"],
    )


async def test_metrics_are_the_ledgers_stats_in_the_seed_shape(
    settings: Settings, generator: object, seed_models: FakeOllama, tmp_path: Path
) -> None:
    recorded = msgspec.structs.replace(settings, database_url=database_url("", str(tmp_path / "data")))
    async with ledger(recorded), seed_edge(recorded, "shared", default_model=TEXT_MODEL) as http:
        for prompt in ("one", "two"):
            assert (await http.post("/api/v1/generate", json={"prompt": prompt})).status_code == 200
        async with asyncio.timeout(10):
            while (metrics := (await http.get("/api/v1/metrics")).json())["total_requests"] < 2:
                await asyncio.sleep(0.1)
        windowed = await http.get("/api/v1/metrics?window_minutes=5")
    assert metrics["successful_requests"] == 2 and metrics["failed_requests"] == 0
    assert metrics["requests_by_model"] == {TEXT_MODEL: 2} and metrics["errors_by_type"] == {}
    assert 0 < metrics["p50_latency_ms"] <= metrics["p95_latency_ms"] <= metrics["p99_latency_ms"]
    assert windowed.status_code == 200 and windowed.json()["total_requests"] == 2


# --- errors and headers, as the seed documents them --------------------------------------------


async def test_a_request_that_waits_past_its_time_is_503_request_timeout_with_retry_after(
    settings: Settings, seed_models: FakeOllama
) -> None:
    # No generator: the request waits in the queue until its deadline (here 1 s, not the seed's 120 s).
    async with seed_edge(settings, "shared", request_timeout_s=1.0) as http:
        response = await http.post("/api/v1/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        streamed = await http.post(
            "/api/v1/chat", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
    [end] = [json.loads(line) for line in data_lines(streamed.text)]  # the stream had begun: in-stream
    assert end["done"] is True and end["code"] == "request_timeout" and end["chunk"] == ""
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["code"] == "request_timeout" and body["retry_after"] == 2.0
    assert response.headers["Retry-After"] == "2" and body["request_id"] == _request_id(response)


async def test_a_full_queue_is_503_queue_full_with_retry_after(
    settings: Settings, seed_models: FakeOllama
) -> None:
    async with seed_edge(settings, "shared", max_queue=1, default_model=TEXT_MODEL) as http:
        first = asyncio.create_task(http.post("/api/v1/generate", json={"prompt": "wait", "stream": True}))
        try:
            async with asyncio.timeout(5):
                while (await http.get("/api/v1/queue/stats")).json()["queued"] < 1:
                    await asyncio.sleep(0.05)
            refused = await http.post("/api/v1/generate", json={"prompt": "and me"})
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "queue_full" and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["retry_after"] and refused.json()["error_type"] == "HTTPException"


async def test_validation_is_422_batch_and_agents_are_501_naming_the_feature(
    settings: Settings, seed_models: FakeOllama
) -> None:
    async with seed_edge(settings, "shared") as http:
        invalid = await http.post("/api/v1/chat", json={"messages": [], "nonsense": 1})
        assert invalid.status_code == 422 and invalid.json()["error_type"] == "ValidationError"
        assert invalid.json()["code"] == "bad_request" and _request_id(invalid)

        batch = await http.post("/api/v1/batch/chat", json={"requests": []})
        assert batch.status_code == 501 and batch.json()["code"] == "not_implemented"
        assert "batch processing" in batch.json()["error"] and "/openai/v1/batches" in batch.json()["error"]
        agents = await http.post("/api/v1/agents/researcher/run", json={})
        assert agents.status_code == 501 and "agent" in agents.json()["error"]

        stats = await http.get("/api/v1/queue/stats")
        assert (
            stats.status_code == 200
            and stats.json()["queued"] == 0
            and stats.json()["max_queue_size"] == 1000
        )


async def test_the_readme_size_limits_are_400_prompt_too_large_and_413_request_too_large(
    settings: Settings, seed_models: FakeOllama
) -> None:
    seed_limits = {"max_body_bytes": 1_500_000, "context_tokens": 4096, "default_model": TEXT_MODEL}
    async with seed_edge(settings, "shared", **seed_limits) as http:
        long = await http.post("/api/v1/generate", json={"prompt": "word " * 5000})  # ~6 000 tokens
        huge = await http.post("/api/v1/generate", json={"prompt": "x" * 1_600_000})
    assert long.status_code == 400 and long.json()["code"] == "prompt_too_large", long.text
    assert huge.status_code == 413 and huge.json()["code"] == "request_too_large", huge.text
    assert _request_id(long) and _request_id(huge)


async def test_the_vlm_compression_knobs_are_refused_by_name_not_ignored(
    settings: Settings, generator: object, seed_models: FakeOllama
) -> None:
    base = {"model": VLM_MODEL, "messages": [{"role": "user", "content": "?"}]}
    base["images"] = [image_data(photo(64, 48))]
    knobs = [("image_compression", False), ("max_dimension", 512), ("compression_format", "png")]
    async with seed_edge(settings, "shared") as http:
        for field, value in knobs:
            refused = await http.post("/api/v1/vlm", json={**base, field: value})
            assert refused.status_code == 400, (field, refused.text)
            assert refused.json()["code"] == "unsupported" and f"`{field}`" in refused.json()["error"]
        # The defaults the seed documents stay accepted.
        ok = await http.post("/api/v1/vlm", json={**base, "image_compression": True})
    assert ok.status_code == 200, ok.text


async def test_with_keys_a_project_is_a_tenant_whose_concurrency_answers_429_with_retry_after(
    settings: Settings, seed_models: FakeOllama, tmp_path: Path
) -> None:
    # The seed's "per-tenant concurrency ... 429 with Retry-After": the tenant's `max_inflight`.
    keyed = with_auth(settings, tmp_path, a="max_inflight = 1")
    chat = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]}
    async with seed_edge(keyed, "shared") as http:
        health = await http.get("/api/v1/health")  # public, as the seed's was
        anonymous = await http.post("/api/v1/chat", json=chat)
        first = asyncio.create_task(
            http.post("/api/v1/chat", json=chat | {"stream": True}, headers=bearer("a"))
        )
        try:
            async with asyncio.timeout(5):
                while (await http.get("/api/v1/queue/stats", headers=bearer("a"))).json()["queued"] < 1:
                    await asyncio.sleep(0.05)
            second = await http.post("/api/v1/chat", json=chat, headers=bearer("a"))
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        create = await http.post(
            "/api/v1/models/create", json={"name": "x", "modelfile": "FROM llama3.2:1b"}, headers=bearer("a")
        )
    assert health.status_code == 200 and health.json()["status"] == "unhealthy"  # no generator here
    assert (
        anonymous.status_code == 401 and anonymous.json()["code"] == "unauthorized" and _request_id(anonymous)
    )
    assert second.status_code == 429 and second.json()["code"] == "rate_limited", second.text
    assert second.json()["error_type"] == "RateLimitExceeded" and int(second.headers["Retry-After"]) >= 1
    assert create.status_code == 403 and create.json()["code"] == "forbidden"  # an admin key's


def test_shared_claims_the_badges_and_simple_paths_and_refuses_to_start_beside_them() -> None:
    with pytest.raises(DialectConflict, match="'badges' and 'shared' both claim"):
        create_app(Settings(dialects=["badges", "shared"]))
    with pytest.raises(DialectConflict, match="'shared' and 'simple' both claim POST /api/v1/generate"):
        create_app(Settings(dialects=["shared", "simple"]))
    app = create_app(Settings(dialects=["router", "queued", "shared"]))
    assert "/api/v1/vlm" in app.route_handler_method_map
    with pytest.raises(ValueError, match="LLMBUS_IMAGE_QUALITY"):
        create_app(Settings(image_quality=101))


# --- images shrunk at the edge, for every API --------------------------------------------------


async def test_images_are_shrunk_before_they_are_queued_on_every_api(
    settings: Settings, generator: object, seed_models: FakeOllama
) -> None:
    jpeg = photo(1600, 1200)
    async with seed_edge(settings, "shared", image_max_side=512, image_quality=80) as http:
        vlm = await http.post(
            "/api/v1/vlm",
            json={
                "model": VLM_MODEL,
                "messages": [{"role": "user", "content": "?"}],
                "images": [image_data(jpeg)],
            },
        )
        ollama = await http.post(
            "/ollama/api/generate",
            json={
                "model": VLM_MODEL,
                "prompt": "?",
                "images": [base64.b64encode(jpeg).decode()],
                "stream": False,
            },
        )
    assert vlm.status_code == 200 and ollama.status_code == 200, (vlm.text, ollama.text)
    sent = [c.body for c in seed_models.calls if c.path in ("/api/chat", "/api/generate")]
    images = [sent[0]["messages"][-1]["images"][0], sent[1]["images"][0]]
    for image in images:
        data = base64.b64decode(image)
        assert max(Image.open(io.BytesIO(data)).size) == 512 and len(data) < len(jpeg) / 10
    assert vlm.json()["compression_savings_bytes"] == len(jpeg) - len(base64.b64decode(images[0]))


async def test_batch_lines_images_are_shrunk_too(settings: Settings, seed_models: FakeOllama) -> None:
    # The batcher publishes a batch's lines itself, not through the edge's pipeline: it shrinks them.
    jpeg = photo(1600, 1200)
    shrinking = msgspec.structs.replace(settings, image_max_side=512, image_quality=80)
    line = {"model": VLM_MODEL, "messages": [{"role": "user", "content": "?"}]}
    line["messages"][0]["images"] = [base64.b64encode(jpeg).decode()]  # type: ignore[index]
    async with Edge(shrinking) as edge, httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        generator, batcher = Generator(shrinking), BatcherService(shrinking)
        await generator.start()
        await batcher.start()
        try:
            body = {"endpoint": "/v1/chat", "lines": [{"custom_id": "a", "body": line}], "stream": True}
            async with http.stream("POST", "/v1/batches", json=body) as response:
                events = [event async for event in sse_events(response)]
            output = (await http.get(f"/v1/batches/{events[-1].data['batch_id']}/output")).text
        finally:
            await batcher.stop()
            await generator.stop(grace=0)
    assert events[-1].event == "done" and events[-1].data["completed"] == 1, output
    [sent] = [c.body for c in seed_models.calls if c.path == "/api/chat"]
    data = base64.b64decode(sent["messages"][-1]["images"][0])
    assert max(Image.open(io.BytesIO(data)).size) == 512 and len(data) < len(jpeg) / 10


async def test_shrinking_keeps_the_bound_never_grows_an_image_and_refuses_what_is_not_one(
    settings: Settings,
) -> None:
    out = io.BytesIO()
    Image.new("RGBA", (2000, 1000), (10, 20, 30, 128)).save(out, "PNG")
    png = out.getvalue()
    resized = ImagePolicy(max_side=500).image(png, "x")
    assert Image.open(io.BytesIO(resized)).format == "PNG" and Image.open(io.BytesIO(resized)).size == (
        500,
        250,
    )
    assert ImagePolicy(quality=80).image(png, "x") is png  # a flat PNG beats its JPEG: kept

    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.effect_noise((300, 200), 50).convert("RGB").save(rotated, "JPEG", quality=95, exif=exif)
    upright = Image.open(io.BytesIO(ImagePolicy(max_side=150).image(rotated.getvalue(), "x")))
    assert upright.size == (100, 150)  # orientation applied, since re-encoding drops the EXIF tag

    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")  # 100 Mpixels in a few kB
    with pytest.raises(LlmbusError, match="x: the image has too many pixels"):
        ImagePolicy(max_side=500).image(bomb.getvalue(), "x")

    policy = msgspec.structs.replace(settings, image_max_side=64)
    wire = GenerateRequest(
        id="r1", model="m", messages=[Message(role="user", content="?", images=["bm90IGFuIGltYWdl"])]
    )
    with pytest.raises(LlmbusError) as caught:
        await shrink(policy, wire)
    assert (
        caught.value.code is ErrorCode.BAD_REQUEST
        and "messages[0].images[0]: not a readable image" in caught.value.message
    )
    unchanged, tally = await shrink(settings, wire)  # compression off: nothing decoded
    assert unchanged is wire and tally.images == 0
