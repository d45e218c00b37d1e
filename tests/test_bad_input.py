"""Bad input gets a 4xx with a stable code, never reaches NATS, never a stack trace."""

from __future__ import annotations

import time

import msgspec
import nats
import pytest
from httpx import AsyncClient

from contracts import headers, subjects
from services.edge.depth import MAX_JSON_DEPTH, too_deep
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


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


async def test_json_nested_too_deeply_is_400_on_every_post_route(client: AsyncClient) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    posts = [path for path, operations in schema["paths"].items() if "post" in operations]
    assert len(posts) >= 17
    # A file upload's body is multipart, never decoded as JSON: it refuses a JSON body as such.
    upload = await client.post(
        "/openai/v1/files", content=nested(5000), headers={"content-type": "application/json"}
    )
    assert upload.status_code == 400 and "multipart/form-data" in upload.text
    posts.remove("/openai/v1/files")
    posts.remove("/openai/v1/batches/{batch_id}/cancel")  # takes no body
    posts.remove("/v1/batches/{batch_id}/cancel")
    # A blob upload's body is a model file, never JSON: refused whatever it holds, naming why.
    blob = await client.post(
        "/ollama/api/blobs/sha256:00", content=nested(5000), headers={"content-type": "application/json"}
    )
    assert blob.status_code == 400 and "blobs" in blob.text
    posts.remove("/ollama/api/blobs/{digest}")
    deep = b'{"model": "llama3.2:1b", "input": ' + nested(5000) + b"}"
    fmt = msgspec.json.encode({"model": "llama3.2:1b", "messages": USER})[:-1] + b', "format": '
    fmt += b'{"a": ' * 3000 + b"{}" + b"}" * 3000 + b"}"
    cases = [(path.replace("{name}", "summarize"), deep) for path in posts] + [("/v1/chat", fmt)]
    for path, content in cases:
        response = await client.post(path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.status_code, response.text[:200])
        assert "nested" in response.text, (path, response.text[:200])
    # As deep as a real body gets (a JSON schema in `format`, say) is fine.
    ok = {"model": "llama3.2:1b", "messages": USER, "format": {"type": "object"}}
    assert (await client.post("/v1/chat", json=ok)).status_code == 200
    brackets = [{"role": "user", "content": '["\\' + "[{" * 5000}]  # in a string they do not nest
    assert (
        await client.post("/v1/chat", json={"model": "llama3.2:1b", "messages": brackets})
    ).status_code == 200


def test_the_depth_limit_is_exact_and_cheap() -> None:
    assert not too_deep(nested(MAX_JSON_DEPTH)) and too_deep(nested(MAX_JSON_DEPTH + 1))
    assert not too_deep(b"[]" * 100_000)  # many brackets, shallow
    assert too_deep(b'{"a": "\\"' + b", [" * 101 + b"]" * 101 + b"}")  # an escaped quote ends no string
    body = b"[" * 500_000 + b"]" * 500_000  # a whole 1 MB body of brackets
    started = time.perf_counter()
    assert too_deep(body)
    assert time.perf_counter() - started < 0.5


async def test_a_request_nested_too_deeply_on_the_bus_is_refused_by_the_worker(
    client: AsyncClient, nats_server: NatsServer
) -> None:
    # A direct publisher skips the edge's limit: the worker's decoder refuses it, not a redelivery loop.
    request_id = "deep-request-1"
    body = b'{"id": "deep-request-1", "model": "llama3.2:1b", "prompt": "x", "format": '
    body += b'{"a": ' * 3000 + b"{}" + b"}" * 3000 + b"}"
    nc = await nats.connect(nats_server.url)
    try:
        events = await nc.subscribe(subjects.event_subject(request_id))
        # As the contract asks: the id again as `Nats-Msg-Id` (the worker trusts a reply to that id).
        reply = {headers.REPLY: subjects.event_subject(request_id), headers.MSG_ID: request_id}
        await nc.jetstream().publish(subjects.generate_subject("llama3.2:1b"), body, headers=reply)
        error = msgspec.json.decode((await events.next_msg(5)).data)
        assert error["type"] == "error" and error["code"] == "bad_request"
        assert "recursion" in error["message"]
    finally:
        await nc.close()
