"""The backends' one HTTP client (services/runtime/backends/transport.py): httpx over the lean
transport, with credentials in the URL, the proxy variables, keep-alive, cancellation and one error
mapping, against the fake Ollama."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from contracts import ErrorCode, GenerateRequest, LlmbusError, Message
from services.runtime.backends import OllamaBackend, OpenAIBackend
from services.runtime.backends.transport import LeanTransport, http_client, through_proxy
from services.runtime.nats_server import free_port
from tests.fakes.ollama import FakeConfig, FakeOllama

MODEL = "llama3.2:1b"


def chat(n: int = 0) -> GenerateRequest:
    return GenerateRequest(id=f"transport-{n:04d}", model=MODEL, messages=[Message("user", f"hello {n}")])


async def answer(backend: OllamaBackend, request: GenerateRequest) -> list[object]:
    return [piece async for piece in backend.generate(request)]


def chats(fake: FakeOllama) -> list[object]:
    return [call for call in fake.calls if call.path == "/api/chat"]


async def test_credentials_in_the_url_become_basic_auth_and_leave_the_host_header(
    fake_ollama: FakeOllama,
) -> None:
    url = fake_ollama.url.replace("http://", "http://llm%40ops:s3cret@")
    backend = OllamaBackend(url)
    try:
        await answer(backend, chat())
        assert await backend.version()
    finally:
        await backend.aclose()
    expected = "Basic " + base64.b64encode(b"llm@ops:s3cret").decode()
    assert [call.headers.get("authorization") for call in fake_ollama.calls] == [expected, expected]
    assert all("s3cret" not in call.headers["host"] for call in fake_ollama.calls)


async def test_an_openai_backends_key_goes_through_the_same_client(fake_ollama: FakeOllama) -> None:
    backend = OpenAIBackend(fake_ollama.url, api_key="sk-test")
    try:
        with pytest.raises(LlmbusError):  # the fake speaks only Ollama's own API: 404s
            await backend.version()
    finally:
        await backend.aclose()
    seen = [call.headers.get("authorization") for call in fake_ollama.calls]
    assert seen and set(seen) == {"Bearer sk-test"}
    assert isinstance(backend._client._transport, LeanTransport)


async def test_the_proxy_variables_are_honoured(
    fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake answers a forward proxy's absolute-form request itself: a host that does not
    # exist is reached only through the proxy.
    target = "http://ollama.invalid:11434"
    monkeypatch.setenv("HTTP_PROXY", fake_ollama.url)
    monkeypatch.setenv("NO_PROXY", "")
    assert through_proxy(target)
    backend = OllamaBackend(target)
    try:
        pieces = await answer(backend, chat())
    finally:
        await backend.aclose()
    assert pieces and [call.headers["host"] for call in chats(fake_ollama)] == ["ollama.invalid:11434"]
    monkeypatch.setenv("NO_PROXY", "ollama.invalid")
    assert not through_proxy(target)


async def test_connections_are_kept_alive_and_one_left_early_is_closed() -> None:
    async with FakeOllama(FakeConfig(tokens=50, token_interval=0.01)) as fake:
        backend = OllamaBackend(fake.url)
        try:
            await answer(backend, chat(1))
            await answer(backend, chat(2))
            transport = backend._client._transport
            assert isinstance(transport, LeanTransport)
            assert [len(idle) for idle in transport._idle.values()] == [1]  # one connection, reused
            stream = backend.generate(chat(3))
            await anext(stream)
            await stream.aclose()  # the client went away: the model server must learn it
            [*_, left] = await fake.wait_disconnected()
            assert left.tokens_sent < 50
        finally:
            await backend.aclose()


async def test_transport_failures_map_to_the_same_codes_on_every_backend() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    for backend in (OllamaBackend(closed), OpenAIBackend(closed)):
        try:
            with pytest.raises(LlmbusError) as refused:
                await answer(backend, chat())  # type: ignore[arg-type]
            assert refused.value.code == ErrorCode.BACKEND_UNAVAILABLE
        finally:
            await backend.aclose()
    async with FakeOllama(FakeConfig(tokens=20, disconnect_after=3)) as fake:
        backend = OllamaBackend(fake.url)
        try:
            with pytest.raises(LlmbusError) as broke:
                await answer(backend, chat())
            assert (
                broke.value.code == ErrorCode.BACKEND_ERROR and "backend stream failed" in broke.value.message
            )
        finally:
            await backend.aclose()


async def test_a_read_timeout_is_honoured_when_one_is_set() -> None:
    async with FakeOllama(FakeConfig(first_token_delay=2.0)) as fake:
        client = http_client(fake.url)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/api/generate", json={"model": MODEL, "prompt": "hi"}, timeout=0.2)
            assert asyncio.get_running_loop().time() - started < 1.5
            assert (await client.get("/api/version")).json()["version"]  # the pool still serves
        finally:
            await client.aclose()
