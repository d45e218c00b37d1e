"""Edge admission through the public API: API keys (401/403), tenant limits shared by every edge
replica (429 + Retry-After), overload refused before it queues (503 queue_full + Retry-After),
size limits (413, 400 prompt_too_large), max_tokens capped, CORS, and request ownership."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest

from contracts import subjects
from services.edge.quota import Quota, open_bucket
from services.edge.tenants import Tenant, hash_key
from services.generator.main import Generator
from services.runtime import bus
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama

MODEL = "llama3.2:1b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
KEYS = {"a": "llmbus_key_of_tenant_a", "b": "llmbus_key_of_tenant_b", "admin": "llmbus_key_of_the_admin"}


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def tenants_toml(path: Path, a: str = "", b: str = "") -> str:
    """Tenant `a` with the limits in `a` (TOML lines), `b` likewise, and an unlimited admin."""
    path.write_text(
        f'[tenants.a]\nkeys = ["{hash_key(KEYS["a"])}"]\nmodels = ["llama3.2:*"]\n{a}\n'
        f'[tenants.b]\nkeys = ["{hash_key(KEYS["b"])}"]\n{b}\n'
        f'[tenants.admin]\nkeys = ["{hash_key(KEYS["admin"])}"]\nadmin = true\n'
    )
    return str(path)


def with_auth(settings: Settings, tmp_path: Path, a: str = "", b: str = "", **more: object) -> Settings:
    file = tenants_toml(tmp_path / "tenants.toml", a, b)
    return msgspec.structs.replace(settings, auth="on", tenants_file=file, **more)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        yield http


@contextlib.asynccontextmanager
async def two_edges(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two edges on one bus (and so one set of tenant limits), a client for each."""
    other = msgspec.structs.replace(settings, http_port=free_port())
    async with (
        Edge(settings) as edge_one,
        Edge(other) as edge_two,
        httpx.AsyncClient(base_url=edge_one.url, timeout=10) as first,
        httpx.AsyncClient(base_url=edge_two.url, timeout=10) as second,
    ):
        yield first, second


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code, body


async def test_a_missing_or_wrong_key_is_401_on_every_api_but_probes_stay_open(
    settings: Settings, tmp_path: Path, generator: Generator
) -> None:
    async with running(with_auth(settings, tmp_path)) as http:
        assert_error(await http.post("/v1/chat", json=CHAT), 401, "unauthorized")
        wrong = {"Authorization": "Bearer llmbus_not_a_key"}
        assert_error(await http.post("/v1/chat", json=CHAT, headers=wrong), 401, "unauthorized")
        assert_error(await http.post("/openai/v1/chat/completions", json=CHAT), 401, "unauthorized")
        assert (await http.post("/ollama/api/chat", json=CHAT)).status_code == 401
        assert (await http.post("/v1/embed", json={"model": MODEL, "input": "x"})).status_code == 401
        assert (await http.get("/v1/requests/abcdefgh12/events")).status_code == 401
        assert (await http.get("/health/live")).status_code == 200
        ok = await http.post("/v1/chat", json=CHAT, headers=bearer("a"))
        assert ok.status_code == 200 and ok.json()["text"]


async def test_a_model_outside_the_keys_globs_and_an_admin_route_are_403_forbidden(
    settings: Settings, tmp_path: Path, generator: Generator
) -> None:
    async with running(with_auth(settings, tmp_path)) as http:
        other = {**CHAT, "model": "qwen3:14b"}
        assert_error(await http.post("/v1/chat", json=other, headers=bearer("a")), 403, "forbidden")
        openai = await http.post("/openai/v1/chat/completions", json=other, headers=bearer("a"))
        assert openai.status_code == 403 and openai.json()["error"]["code"] == "forbidden"
        embed = await http.post(
            "/v1/embed", json={"model": "nomic-embed-text", "input": "x"}, headers=bearer("a")
        )
        assert_error(embed, 403, "forbidden")
        load = {"model": MODEL}
        assert_error(await http.post("/v1/models/load", json=load, headers=bearer("b")), 403, "forbidden")
        # The admin key passes the guard (what the janitor then says is not this test's business).
        assert (await http.post("/v1/models/load", json=load, headers=bearer("admin"))).status_code != 403
        # Ollama's load idiom (nothing to answer) is the same operation: the same scope.
        ollama_load = await http.post("/ollama/api/generate", json=load, headers=bearer("b"))
        assert ollama_load.status_code == 403 and "admin key" in ollama_load.json()["error"]
        ollama_load = await http.post("/ollama/api/generate", json=load, headers=bearer("admin"))
        assert ollama_load.status_code != 403


async def test_over_requests_per_minute_is_429_with_retry_after_and_other_tenants_are_unaffected(
    settings: Settings, tmp_path: Path, generator: Generator
) -> None:
    async with running(with_auth(settings, tmp_path, a="requests_per_minute = 2")) as http:
        for _ in range(2):
            assert (await http.post("/v1/chat", json=CHAT, headers=bearer("a"))).status_code == 200
        refused = await http.post("/v1/chat", json=CHAT, headers=bearer("a"))
        assert_error(refused, 429, "rate_limited")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.json()["error"]["retry_after"] > 0
        openai = await http.post("/openai/v1/chat/completions", json=CHAT, headers=bearer("a"))
        assert openai.status_code == 429 and "Retry-After" in openai.headers
        ollama = await http.post("/ollama/api/chat", json={**CHAT, "stream": False}, headers=bearer("a"))
        assert ollama.status_code == 429 and "Retry-After" in ollama.headers
        assert (await http.post("/v1/chat", json=CHAT, headers=bearer("b"))).status_code == 200


async def test_over_max_inflight_is_429_until_a_running_request_ends(
    settings: Settings, tmp_path: Path, generator: Generator, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.first_token_delay = 0.5
    async with running(with_auth(settings, tmp_path, a="max_inflight = 1")) as http:
        first = asyncio.create_task(http.post("/v1/chat", json=CHAT, headers=bearer("a")))
        await fake_ollama.wait_calls(1, path="/api/chat", timeout=5)
        refused = await http.post("/v1/chat", json=CHAT, headers=bearer("a"))
        assert_error(refused, 429, "rate_limited")
        assert refused.headers["Retry-After"] == "1"
        assert (await first).status_code == 200
        fake_ollama.config.first_token_delay = 0
        for _ in range(20):  # the slot is given back in the background, right after the answer
            again = await http.post("/v1/chat", json=CHAT, headers=bearer("a"))
            if again.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert again.status_code == 200


async def test_tokens_per_minute_are_counted_from_each_answers_usage(
    settings: Settings, tmp_path: Path, generator: Generator
) -> None:
    async with running(with_auth(settings, tmp_path, a="tokens_per_minute = 5")) as http:
        first = await http.post("/v1/chat", json=CHAT, headers=bearer("a"))
        assert first.json()["usage"]["total_tokens"] >= 5
        await refused_for_tokens(http, "/v1/chat", CHAT, "a")


async def refused_for_tokens(http: httpx.AsyncClient, path: str, body: dict[str, Any], key: str) -> None:
    """The next calls get 429 for tokens per minute (the tokens are added in the background)."""
    for _ in range(20):
        refused = await http.post(path, json=body, headers=bearer(key))
        if refused.status_code == 429:
            break
        await asyncio.sleep(0.05)
    assert_error(refused, 429, "rate_limited")
    assert "tokens per minute" in refused.json()["error"]["message"]


async def test_two_edges_share_one_tenants_limits(
    settings: Settings, tmp_path: Path, generator: Generator
) -> None:
    async with two_edges(with_auth(settings, tmp_path, a="requests_per_minute = 3")) as (first, second):
        assert (await first.post("/v1/chat", json=CHAT, headers=bearer("a"))).status_code == 200
        assert (await second.post("/v1/chat", json=CHAT, headers=bearer("a"))).status_code == 200
        assert (await first.post("/v1/chat", json=CHAT, headers=bearer("a"))).status_code == 200
        # Three on two edges: the fourth is refused on either, as one edge alone would.
        assert_error(await second.post("/v1/chat", json=CHAT, headers=bearer("a")), 429, "rate_limited")
        assert_error(await first.post("/v1/chat", json=CHAT, headers=bearer("a")), 429, "rate_limited")


async def test_concurrent_admissions_on_two_edges_never_exceed_the_limit(
    settings: Settings, tmp_path: Path, generator: Generator
) -> None:
    async with two_edges(with_auth(settings, tmp_path, a="requests_per_minute = 5")) as (first, second):
        answers = await asyncio.gather(
            *(http.post("/v1/chat", json=CHAT, headers=bearer("a")) for http in [first, second] * 6)
        )
    assert sorted(r.status_code for r in answers) == [200] * 5 + [429] * 7


async def test_a_crashed_edges_inflight_slot_comes_free_after_the_lease_ttl(settings: Settings) -> None:
    nc = await bus.connect(settings, "llmbus-edge")
    try:
        kv = await open_bucket(nc.jetstream())
        tenant = Tenant(name="a", max_inflight=1)
        crashed, alive = Quota(kv, lease_ttl_s=0.6), Quota(kv, lease_ttl_s=0.6)
        await crashed.acquire(tenant, "lease-1")
        await crashed.stop()  # it never releases nor renews: as if its process died
        with pytest.raises(Exception, match="in flight"):
            await alive.acquire(tenant, "lease-2")
        await asyncio.sleep(0.7)
        await alive.acquire(tenant, "lease-2")
        await alive.release(tenant, "lease-2", 0)
        await alive.stop()
    finally:
        await nc.close()


async def test_a_model_backlog_over_its_bound_is_503_queue_full_with_retry_after(
    settings: Settings,
) -> None:
    # No generator: requests stay queued, and the third passes the bound of two.
    async with running(msgspec.structs.replace(settings, max_queue=2)) as http:
        deferred = {**CHAT, "stream": "deferred"}
        for _ in range(2):
            assert (await http.post("/v1/chat", json=deferred)).status_code == 202
        full = await http.post("/v1/chat", json=deferred)
        assert_error(full, 503, "queue_full")
        assert int(full.headers["Retry-After"]) >= 1
        openai = await http.post("/openai/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert openai.status_code == 503 and openai.json()["error"]["code"] == "queue_full"
        # Another model's queue is not full.
        assert (await http.post("/v1/chat", json={**deferred, "model": "qwen3:14b"})).status_code == 202


async def queued(settings: Settings, subject: str) -> int:
    nc = await nats.connect(settings.nats_url)
    try:
        info = await nc.jetstream().stream_info(subjects.REQUEST_STREAM, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


async def test_a_burst_never_queues_more_than_the_bound(settings: Settings) -> None:
    # No generator: what is admitted stays queued. Views refreshed as often as possible, so a
    # look that answers while the burst's publishes are in flight would lose count of them.
    async with running(msgspec.structs.replace(settings, max_queue=3, queue_check_s=0.001)) as http:
        for burst in range(3):
            model = f"burst{burst}:1b"
            answers = await asyncio.gather(
                *(
                    http.post("/v1/chat", json={**CHAT, "model": model, "stream": "deferred"})
                    for _ in range(30)
                )
            )
            statuses = sorted(a.status_code for a in answers)
            assert statuses == [202] * 3 + [503] * 27, (burst, statuses)
            assert await queued(settings, subjects.generate_subject(model)) == 3


async def test_a_drained_queue_is_never_refused(settings: Settings, fake_ollama: FakeOllama) -> None:
    fake_ollama.config.tokens = 3
    settings = msgspec.structs.replace(settings, max_queue=3, queue_check_s=0.2)
    async with running(settings) as http:
        gen = Generator(settings)
        await gen.start()
        try:
            for round_ in range(3):  # each ran to its end
                answers = await asyncio.gather(*(http.post("/v1/chat", json=CHAT) for _ in range(3)))
                refused = [a.text for a in answers if a.status_code != 200]
                assert refused == [], round_
                await asyncio.sleep(0.5)  # idle, longer than the view may get old
        finally:
            await gen.stop(grace=0)
        assert await queued(settings, subjects.generate_subject(MODEL)) == 0
        for _ in range(3):  # empty, and no generator to take them: three fit
            assert (await http.post("/v1/chat", json={**CHAT, "stream": "deferred"})).status_code == 202
        assert_error(await http.post("/v1/chat", json={**CHAT, "stream": "deferred"}), 503, "queue_full")


async def test_a_body_over_the_limit_is_413_request_too_large(client: httpx.AsyncClient) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}  # the fixture allows 64 KiB
    assert_error(await client.post("/v1/chat", json=big), 413, "request_too_large")


async def test_a_prompt_over_the_models_context_is_400_prompt_too_large(
    settings: Settings, generator: Generator
) -> None:
    async with running(msgspec.structs.replace(settings, context_tokens=100)) as http:
        long = {**CHAT, "messages": [{"role": "user", "content": "word " * 100}]}  # ~125 tokens
        refused = await http.post("/v1/chat", json=long)
        assert_error(refused, 400, "prompt_too_large")
        openai = await http.post("/openai/v1/completions", json={"model": MODEL, "prompt": "word " * 100})
        assert openai.status_code == 400 and openai.json()["error"]["code"] == "prompt_too_large"
        # A request that asks for a bigger context window (num_ctx) is measured against that.
        roomy = {**long, "options": {"num_ctx": 4096}}
        assert (await http.post("/v1/chat", json=roomy)).status_code == 200


async def test_max_tokens_over_the_maximum_is_capped(
    settings: Settings, generator: Generator, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 50
    async with running(msgspec.structs.replace(settings, max_output_tokens=3)) as http:
        native = await http.post("/v1/chat", json={**CHAT, "options": {"num_predict": 40}})
        assert native.json()["usage"]["completion_tokens"] == 3
        assert native.json()["finish_reason"] == "length"
        openai = await http.post("/openai/v1/chat/completions", json={**CHAT, "max_tokens": 1000})
        assert openai.json()["usage"]["completion_tokens"] == 3
        unbounded = await http.post("/v1/chat", json={**CHAT, "options": {"num_predict": -1}})
        assert unbounded.json()["usage"]["completion_tokens"] == 3
        sent = [call.body["options"]["num_predict"] for call in fake_ollama.calls if call.path == "/api/chat"]
        assert sent == [3, 3, 3]


async def test_cors_is_closed_by_default_and_open_to_configured_origins(
    settings: Settings, generator: Generator
) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with running(settings) as http:
        answer = await http.options("/v1/chat", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
    settings = msgspec.structs.replace(settings, http_port=free_port(), cors_origins=["https://app.example"])
    async with running(settings) as http:
        answer = await http.options("/v1/chat", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        other = await http.options("/v1/chat", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"


async def test_only_the_owning_tenant_can_resume_or_cancel_a_request(
    settings: Settings, tmp_path: Path
) -> None:
    # No generator: the request stays queued, so cancelling it is meaningful.
    async with running(with_auth(settings, tmp_path)) as http:
        started = await http.post("/v1/chat", json={**CHAT, "stream": "deferred"}, headers=bearer("a"))
        request_id = started.json()["request_id"]
        assert len(request_id) >= 32  # a random uuid4: not guessable
        assert_error(
            await http.get(f"/v1/requests/{request_id}/events", headers=bearer("b")), 404, "not_found"
        )
        assert_error(await http.delete(f"/v1/requests/{request_id}", headers=bearer("b")), 404, "not_found")
        assert (await http.delete(f"/v1/requests/{request_id}", headers=bearer("a"))).status_code == 202


async def test_the_same_idempotency_key_from_two_tenants_makes_two_requests(
    settings: Settings, tmp_path: Path, generator: Generator
) -> None:
    async with running(with_auth(settings, tmp_path)) as http:
        key = {"Idempotency-Key": "order-12345"}
        one = await http.post("/v1/chat", json=CHAT, headers={**bearer("a"), **key})
        two = await http.post("/v1/chat", json=CHAT, headers={**bearer("b"), **key})
        assert one.status_code == two.status_code == 200
        assert one.json()["request_id"] != two.json()["request_id"]
        again = await http.post("/v1/chat", json=CHAT, headers={**bearer("a"), **key})
        assert again.json()["request_id"] == one.json()["request_id"]  # a retry still attaches


def test_keys_new_prints_a_key_whose_hash_the_tenants_file_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli import main
    from services.edge.tenants import Keyring

    with pytest.raises(SystemExit) as done:
        main(["keys", "new", "acme"])
    assert done.value.code == 0
    out, err = capsys.readouterr()
    key, digest = out.strip(), err.strip().splitlines()[-1].strip('"')
    assert key.startswith("llmbus_") and len(key) > 40 and key not in err
    file = tmp_path / "tenants.toml"
    file.write_text(f'[tenants.acme]\nkeys = ["{digest}"]\n')
    tenant = Keyring.load(file).find(key)
    assert tenant is not None and tenant.name == "acme"
    file.write_text(f'[tenants.acme]\nkeys = ["{key}"]\n')  # a key pasted instead of its hash
    with pytest.raises(SystemExit, match="never the key itself"):
        Keyring.load(file)


async def test_a_request_without_max_tokens_gets_the_maximum(
    settings: Settings, generator: Generator, fake_ollama: FakeOllama
) -> None:
    fake_ollama.config.tokens = 50
    async with running(msgspec.structs.replace(settings, max_output_tokens=3)) as http:
        native = await http.post("/v1/chat", json=CHAT)
        assert native.json()["usage"]["completion_tokens"] == 3
        assert native.json()["finish_reason"] == "length"
        openai = await http.post("/openai/v1/chat/completions", json=CHAT)
        assert openai.json()["usage"]["completion_tokens"] == 3
        assert openai.json()["choices"][0]["finish_reason"] == "length"
        ollama = await http.post("/ollama/api/chat", json={**CHAT, "stream": False})
        assert ollama.json()["eval_count"] == 3 and ollama.json()["done_reason"] == "length"
        within = await http.post("/v1/chat", json={**CHAT, "options": {"num_predict": 2}})
        assert within.json()["usage"]["completion_tokens"] == 2  # a smaller ask is kept


CLASSIFY = {"text": "will it rain tomorrow", "labels": ["weather", "sport"], "model": "nomic-embed-text"}


@contextlib.asynccontextmanager
async def classifier(settings: Settings) -> AsyncIterator[None]:
    from services.classifier.main import Classifier

    service = Classifier(msgspec.structs.replace(settings, routes_file="infra/routes.toml"))
    await service.start()
    try:
        yield
    finally:
        await service.stop(grace=0)


async def test_classify_passes_the_same_admission_keys_models_and_rate_limits(
    settings: Settings, tmp_path: Path
) -> None:
    settings = with_auth(settings, tmp_path, a="requests_per_minute = 2", b="requests_per_minute = 9")
    async with classifier(settings), running(settings) as http:
        assert_error(await http.post("/v1/classify", json=CLASSIFY), 401, "unauthorized")
        # Tenant a may only use llama3.2:* models.
        assert_error(await http.post("/v1/classify", json=CLASSIFY, headers=bearer("a")), 403, "forbidden")
        routed = {k: v for k, v in CLASSIFY.items() if k != "model"}  # the routes file's default
        for _ in range(2):
            ok = await http.post("/v1/classify", json=routed, headers=bearer("a"))
            assert ok.status_code == 200, ok.text
        refused = await http.post("/v1/classify", json=routed, headers=bearer("a"))
        assert_error(refused, 429, "rate_limited")
        assert "Retry-After" in refused.headers
        # Classify and chat draw on one budget; the other tenant still has its own.
        assert_error(await http.post("/v1/chat", json=CHAT, headers=bearer("a")), 429, "rate_limited")
        assert (await http.post("/v1/classify", json=CLASSIFY, headers=bearer("b"))).status_code == 200


async def test_classify_tokens_count_against_tokens_per_minute(settings: Settings, tmp_path: Path) -> None:
    settings = with_auth(settings, tmp_path, b="tokens_per_minute = 5")
    async with classifier(settings), running(settings) as http:
        first = await http.post("/v1/classify", json=CLASSIFY, headers=bearer("b"))
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["total_tokens"] >= 5
        await refused_for_tokens(http, "/v1/classify", CLASSIFY, "b")


def edit(path: Path, text: str) -> None:
    path.write_text(text)


async def test_tenants_file_edits_apply_to_the_next_request_and_a_broken_edit_keeps_the_old_tenants(
    settings: Settings,
    tmp_path: Path,
    generator: Generator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("services.edge.tenants.RELOAD_CHECK_S", 0.0)  # look on every request
    settings = with_auth(settings, tmp_path)
    file = Path(settings.tenants_file)
    later = {"Authorization": "Bearer llmbus_a_key_added_later"}
    async with running(settings) as http:
        assert (await http.post("/v1/chat", json=CHAT, headers=bearer("a"))).status_code == 200
        assert_error(await http.post("/v1/chat", json=CHAT, headers=later), 401, "unauthorized")
        # Add a key to tenant a and give it its first limit: no restart.
        edit(
            file,
            f'[tenants.a]\nkeys = ["{hash_key(KEYS["a"])}", "{hash_key("llmbus_a_key_added_later")}"]\n'
            f'requests_per_minute = 1\n[tenants.b]\nkeys = ["{hash_key(KEYS["b"])}"]\n',
        )
        assert (await http.post("/v1/chat", json=CHAT, headers=later)).status_code == 200
        assert_error(await http.post("/v1/chat", json=CHAT, headers=bearer("a")), 429, "rate_limited")
        # A broken edit is logged and ignored: the tenants as they were keep working.
        edit(file, "[tenants.a\nkeys = oops\n")
        with caplog.at_level("ERROR", logger="services.edge.tenants"):
            assert (await http.post("/v1/chat", json=CHAT, headers=bearer("b"))).status_code == 200
        assert any("invalid tenants file" in r.getMessage() for r in caplog.records)
        assert_error(await http.post("/v1/chat", json=CHAT, headers=bearer("a")), 429, "rate_limited")
        # Removing a key revokes it on the next request.
        edit(file, f'[tenants.b]\nkeys = ["{hash_key(KEYS["b"])}"]\n')
        assert_error(await http.post("/v1/chat", json=CHAT, headers=bearer("a")), 401, "unauthorized")
        assert (await http.post("/v1/chat", json=CHAT, headers=bearer("b"))).status_code == 200


async def test_a_body_the_request_stream_cannot_hold_is_413_not_500(settings: Settings) -> None:
    # The request stream was created by a service with a smaller LLMBUS_MAX_BODY_BYTES than this
    # edge's (its max_msg_size follows the creator's setting): the edge accepts the body, JetStream
    # refuses the message. That is the client's 413 naming the stream's limit, not a 500.
    small = msgspec.structs.replace(settings, max_body_bytes=2048)
    nc = await bus.connect(small, "generator")
    try:
        await bus.provision(nc.jetstream(), small)
    finally:
        await nc.close()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 8000}]}  # < 64 KiB, > 4 KiB
    async with Edge(settings) as edge, httpx.AsyncClient(base_url=edge.url, timeout=10) as http:
        response = await http.post("/v1/chat", json=big)
        assert_error(response, 413, "request_too_large")
        assert "4096" in response.json()["error"]["message"]  # the stream's limit, named
        assert (await http.post("/v1/chat", json={**CHAT, "stream": "deferred"})).status_code == 202
