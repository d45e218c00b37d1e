"""Bad input gets a 4xx with a stable code, never reaches NATS, never a stack trace."""

from __future__ import annotations

import msgspec
import nats
import pytest
from httpx import AsyncClient

from contracts import subjects
from services.runtime.nats_server import NatsServer
from tests.fakes.ollama import FakeOllama

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "content", "code", "status"),
    [
        ("/v1/chat", b"{not json", "bad_request", 400),
        ("/v1/chat", b"", "bad_request", 400),
        ("/v1/chat", b"[]", "bad_request", 400),
        (
            "/v1/chat",
            msgspec.json.encode({"model": "m", "messages": USER, "surprise": 1}),
            "bad_request",
            400,
        ),
        ("/v1/chat", msgspec.json.encode({"model": 5, "messages": USER}), "bad_request", 400),
        ("/v1/chat", msgspec.json.encode({"model": "llama3.2:1b", "messages": []}), "bad_request", 400),
        ("/v1/chat", msgspec.json.encode({"model": "llama3.2:1b"}), "bad_request", 400),
        ("/v1/chat", msgspec.json.encode({"model": "a b*>", "messages": USER}), "bad_request", 400),
        ("/v1/chat", msgspec.json.encode({"model": "", "messages": USER}), "bad_request", 400),
        (
            "/v1/chat",
            msgspec.json.encode({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
            "bad_request",
            400,
        ),
        (
            "/v1/chat",
            msgspec.json.encode({"model": "m", "messages": [{"role": "system", "content": "only"}]}),
            "bad_request",
            400,
        ),
        (
            "/v1/chat",
            msgspec.json.encode({"model": "m", "messages": USER, "options": {"temperature": "hot"}}),
            "bad_request",
            400,
        ),
        (
            "/v1/chat",
            msgspec.json.encode({"model": "m", "messages": USER, "options": {"num_predict": 0}}),
            "bad_request",
            400,
        ),
        (
            "/v1/chat",
            msgspec.json.encode({"model": "m", "messages": USER, "timeout": -1}),
            "bad_request",
            400,
        ),
        ("/v1/generate", msgspec.json.encode({"model": "m"}), "bad_request", 400),
        (
            "/v1/generate",
            msgspec.json.encode({"model": "m", "prompt": "x" * 70_000}),
            "request_too_large",
            413,
        ),
        ("/v1/nothing-here", b"{}", "not_found", 404),
    ],
    ids=lambda value: value[:40].decode(errors="replace") if isinstance(value, bytes) else None,
)
async def test_bad_input_is_refused_with_a_stable_code(
    client: AsyncClient,
    nats_server: NatsServer,
    fake_ollama: FakeOllama,
    path: str,
    content: bytes,
    code: str,
    status: int,
) -> None:
    response = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and "Traceback" not in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]

    nc = await nats.connect(nats_server.url)
    info = await nc.jetstream().stream_info(subjects.REQUEST_STREAM)
    await nc.close()
    assert info.state.messages == 0 and info.state.first_seq <= 1  # nothing was ever published
    assert [c.path for c in fake_ollama.calls if c.path != "/api/version"] == []


async def test_wrong_method_is_a_clear_error(client: AsyncClient) -> None:
    response = await client.get("/v1/chat")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "bad_request"
