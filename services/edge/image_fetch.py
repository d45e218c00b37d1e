"""Images in requests: the per-image size limit, and OpenAI's `image_url` with an `http(s)` URL.

Every image (a `data:` URL, Ollama's `images`, a fetched one) is at most `LLMBUS_MAX_IMAGE_BYTES`
decoded: `413 image_too_large`, naming it. Remote images are fetched only from the hosts an
operator lists in `LLMBUS_IMAGE_FETCH_HOSTS` (off by default: the URL is refused with `400
unsupported`), within `LLMBUS_IMAGE_FETCH_TIMEOUT_S` and the size limit, and never from a
private, loopback, link-local or otherwise non-global address (checked on the address each
connection really uses, so DNS cannot be turned against it), unless
`LLMBUS_IMAGE_FETCH_ALLOW_PRIVATE` says so (tests). Fetched images count against
`LLMBUS_MAX_BODY_BYTES` with the body, since the request crosses the bus as one message.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from contracts import ErrorCode, GenerateRequest, LlmbusError
from services.runtime.settings import Settings

_REDIRECTS = 3


def decoded_size(b64: str) -> int:
    return len(b64) * 3 // 4 - b64[-2:].count("=")


def too_large(where: str, size: int, limit: int) -> LlmbusError:
    return LlmbusError(
        ErrorCode.IMAGE_TOO_LARGE,
        f"`{where}` is {size} bytes, over the limit of {limit} bytes per image (LLMBUS_MAX_IMAGE_BYTES)",
    )


def check_sizes(wire: Any, limit: int) -> None:
    """Every image of a generate request within the per-image limit (`413 image_too_large`)."""
    if not isinstance(wire, GenerateRequest):
        return
    found: list[tuple[str, str]] = [(f"images[{j}]", image) for j, image in enumerate(wire.images or ())]
    for i, message in enumerate(wire.messages or ()):
        found += [(f"messages[{i}].images[{j}]", image) for j, image in enumerate(message.images or ())]
    for where, image in found:
        if (size := decoded_size(image)) > limit:
            raise too_large(where, size, limit)


class ImageFetcher:
    """Fetches the remote images of one request (a client per request: remote images are rare)."""

    def __init__(self, settings: Settings, body_bytes: int) -> None:
        self.hosts = {host.lower() for host in settings.image_fetch_hosts}
        self.allow_private = settings.image_fetch_allow_private
        self.timeout_s = settings.image_fetch_timeout_s
        self.max_image = settings.max_image_bytes
        self.room = settings.max_body_bytes - body_bytes  # base64 bytes the fetched images may add

    @property
    def enabled(self) -> bool:
        return bool(self.hosts)

    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return parts.scheme in ("http", "https") and (host in self.hosts or f"{host}:{port}" in self.hosts)

    async def fetch_all(self, urls: Iterable[tuple[str, str]]) -> dict[str, str]:
        """`where` -> the image's `data:` URL, for each `(where, url)`; raises on the first failure."""
        transport = httpx.AsyncHTTPTransport()
        transport._pool = httpcore.AsyncConnectionPool(  # every connection goes through the address guard
            ssl_context=ssl.create_default_context(), network_backend=_Guarded(self.allow_private)
        )
        async with httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False) as client:
            return {where: await self._fetch(client, where, url) for where, url in urls}

    async def _fetch(self, client: httpx.AsyncClient, where: str, url: str) -> str:
        try:
            async with asyncio.timeout(self.timeout_s):
                for _ in range(_REDIRECTS + 1):
                    if not self.allowed(url):
                        raise _refused(where, "its host is not in LLMBUS_IMAGE_FETCH_HOSTS")
                    async with client.stream("GET", url, headers={"accept": "image/*"}) as response:
                        if response.is_redirect and "location" in response.headers:
                            url = urljoin(url, response.headers["location"])
                            continue
                        return await self._read(response, where)
                raise _failed(where, f"more than {_REDIRECTS} redirects")
        except TimeoutError:
            raise _failed(
                where, f"no image within {self.timeout_s:g} s (LLMBUS_IMAGE_FETCH_TIMEOUT_S)"
            ) from None
        except _PrivateAddress as exc:
            raise _refused(where, f"{exc} is not a public address") from None
        except httpx.HTTPError as exc:
            raise _failed(where, f"{type(exc).__name__}: {exc}") from None

    async def _read(self, response: httpx.Response, where: str) -> str:
        if response.status_code != 200:
            raise _failed(where, f"the server answered {response.status_code}")
        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if not kind.startswith("image/"):
            raise _failed(where, f"not an image ({kind or 'no content type'})")
        limit = min(self.max_image, self.room * 3 // 4)
        declared = int(response.headers.get("content-length") or 0)
        data = bytearray()
        if declared <= limit:
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    break
        size = max(declared, len(data))
        if size > self.max_image:
            raise too_large(where, size, self.max_image)
        if size > limit:
            raise LlmbusError(
                ErrorCode.REQUEST_TOO_LARGE,
                f"`{where}`: the request with its fetched images is over LLMBUS_MAX_BODY_BYTES",
            )
        encoded = base64.b64encode(bytes(data)).decode()
        self.room -= len(encoded)
        return f"data:{kind};base64,{encoded}"


def _refused(where: str, why: str) -> LlmbusError:
    return LlmbusError(ErrorCode.UNSUPPORTED, f"`{where}` is not supported: {why}")


def _failed(where: str, why: str) -> LlmbusError:
    return LlmbusError(ErrorCode.BAD_REQUEST, f"`{where}` could not be fetched: {why}")


class _PrivateAddress(Exception):  # not an httpcore error: httpx lets it through unchanged
    pass


def public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _Guarded(httpcore.AsyncNetworkBackend):
    """Resolves the host itself and connects only to public addresses (unless allowed)."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = [str(info[4][0]) for info in infos]
        if not self.allow_private:
            for address in addresses:
                if not public(address):
                    raise _PrivateAddress(f"{host} ({address})")
        # TLS still checks the certificate against `host`: httpcore passes the origin as SNI.
        return await self.inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)
