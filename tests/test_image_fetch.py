"""Images: OpenAI `image_url` with an http(s) URL, fetched by the edge only from allowed hosts,
never from a non-public address unless allowed, within time and size limits; and the per-image
413 `image_too_large` for every image, fetched or sent."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import openai
import pytest
import uvicorn

from services.edge.image_fetch import public
from services.generator.main import Generator
from services.runtime.nats_server import free_port
from services.runtime.settings import Settings
from tests.conftest import Edge
from tests.fakes.ollama import FakeOllama
from tests.test_bus_features import VISION

CAT = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # 1032 bytes
BIG = b"\x89PNG\r\n\x1a\n" + b"\0" * 5000


class ImageServer:
    """A local web server with a few images (uvicorn, on 127.0.0.1)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        status, kind, body, extra = 200, b"image/png", b"", []
        if path == "/cat.png":
            body = CAT
        elif path == "/big.png":
            body = BIG
        elif path == "/moved":
            status, extra = 302, [(b"location", b"/cat.png")]
        elif path == "/page":
            kind, body = b"text/html", b"<html></html>"
        elif path == "/slow.png":
            await asyncio.sleep(3)
            body = CAT
        else:
            status = 404
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def images() -> AsyncIterator[ImageServer]:
    app = ImageServer()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=app.port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            await asyncio.sleep(0.01)
    yield app
    server.should_exit = True
    await task


def ask(url: str) -> list[dict[str, Any]]:
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


async def chat(settings: Settings, url: str) -> tuple[Any, Exception | None]:
    async with (
        Edge(settings) as edge,
        openai.AsyncOpenAI(base_url=f"{edge.url}/openai/v1", api_key="unused", max_retries=0) as client,
    ):
        try:
            return await client.chat.completions.create(model=VISION, messages=ask(url)), None  # type: ignore[arg-type]
        except openai.APIStatusError as exc:
            return None, exc


@pytest.fixture
def vision(fake_ollama: FakeOllama, generator: Generator) -> FakeOllama:
    fake_ollama.config.models.append(VISION)
    return fake_ollama


def fetching(settings: Settings, hosts: str, **more: Any) -> Settings:
    return msgspec.structs.replace(settings, image_fetch_hosts=[h.strip() for h in hosts.split(",")], **more)


def refusal(error: Exception | None, status: int) -> dict[str, Any]:
    assert isinstance(error, openai.APIStatusError) and error.status_code == status, error
    body = error.body
    assert isinstance(body, dict)
    return body


async def test_an_allowed_host_is_fetched_and_the_image_reaches_the_backend(
    settings: Settings, images: ImageServer, vision: FakeOllama
) -> None:
    allowed = fetching(settings, f"127.0.0.1:{images.port}", image_fetch_allow_private=True)
    for path in ("/cat.png", "/moved"):  # a redirect is followed (on an allowed host)
        answer, error = await chat(allowed, images.url + path)
        assert error is None and answer.choices[0].message.content
        sent = [c.body for c in vision.calls if c.path == "/api/chat"][-1]
        assert sent["messages"][0]["images"] == [base64.b64encode(CAT).decode()]


async def test_off_by_default_and_never_a_private_address_unless_allowed(
    settings: Settings, images: ImageServer, vision: FakeOllama
) -> None:
    where = "messages[0].content[1].image_url"
    _, error = await chat(settings, images.url + "/cat.png")  # no LLMBUS_IMAGE_FETCH_HOSTS
    body = refusal(error, 400)
    assert (body["code"], body["param"]) == ("unsupported", where)
    _, error = await chat(fetching(settings, "127.0.0.1"), images.url + "/cat.png")
    body = refusal(error, 400)
    assert (body["code"], body["param"]) == ("unsupported", where) and "not a public address" in body[
        "message"
    ]
    _, error = await chat(
        fetching(settings, "127.0.0.1", image_fetch_allow_private=True),
        f"http://localhost:{images.port}/cat.png",
    )
    body = refusal(error, 400)
    assert "not in LLMBUS_IMAGE_FETCH_HOSTS" in body["message"]
    assert not [c for c in vision.calls if c.path == "/api/chat"]  # nothing reached the backend


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_only_public_addresses_are_fetched_from(address: str, ok: bool) -> None:
    assert public(address) is ok


async def test_size_and_time_limits(settings: Settings, images: ImageServer, vision: FakeOllama) -> None:
    allowed = fetching(
        settings, "127.0.0.1", image_fetch_allow_private=True, max_image_bytes=2000, image_fetch_timeout_s=0.5
    )
    _, error = await chat(allowed, images.url + "/big.png")
    body = refusal(error, 413)
    assert body["code"] == "image_too_large" and "5008 bytes" in body["message"]
    big = "data:image/png;base64," + base64.b64encode(BIG).decode()
    _, error = await chat(allowed, big)  # a data: URL has the same limit, named as OpenAI names it
    body = refusal(error, 413)
    assert (
        body["code"] == "image_too_large" and "`messages[0].content[1].image_url` is 5008" in body["message"]
    )
    _, error = await chat(allowed, images.url + "/slow.png")
    assert "no image within 0.5 s" in refusal(error, 400)["message"]
    _, error = await chat(allowed, images.url + "/page")
    assert "not an image" in refusal(error, 400)["message"]
    _, error = await chat(msgspec.structs.replace(allowed, max_body_bytes=1500), images.url + "/cat.png")
    assert refusal(error, 413)["code"] == "request_too_large"  # fetched images count against the body limit
    message = {"role": "user", "content": "x", "images": [base64.b64encode(BIG).decode()]}
    ollama_chat = {"model": VISION, "messages": [message], "stream": False}
    async with Edge(allowed) as edge, httpx.AsyncClient(base_url=edge.url) as http:  # Ollama's images too
        answer = await http.post("/ollama/api/chat", json=ollama_chat)
        assert answer.status_code == 413  # in Ollama's error shape
        assert "`messages[0].images[0]` is 5008 bytes" in answer.json()["error"]
    assert not [c for c in vision.calls if c.path == "/api/chat"]
