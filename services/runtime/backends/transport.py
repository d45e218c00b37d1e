"""The backends' HTTP: one httpx client per model server, over a lean HTTP/1.1 transport.

Every backend (Ollama, OpenAI-compatible) talks through an `httpx.AsyncClient` made by
`http_client`, so they share one client API, one error mapping (`base.http_failures`), TLS
settings, credentials in the URL (httpx turns `http://user:pass@host` into basic auth) and the
proxy variables: a server reached through a proxy (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`,
minus `NO_PROXY`) gets httpx's own transport, which speaks to proxies.

Every other server gets `LeanTransport`, the one cut-off point under httpx. Profiling the
generator showed httpx's default transport (httpcore's pool bookkeeping that checks every
connection on each request, anyio and h11 per chunk) spending most of the generator's CPU on a
streamed generation; this transport writes each request once, parses with httptools (the C
parser uvicorn uses) and hands each read to httpx as it arrives. Leaving a response before it is
complete (a cancelled request) closes its connection, which is how the model server learns to
stop; a complete response returns it to the keep-alive pool. A read timeout is honoured only when
one is set (never on the hot path: generations have none, the request's deadline bounds them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit
from urllib.request import getproxies_environment, proxy_bypass

import httptools
import httpx

# Reading pauses when this many body chunks wait for the consumer (a fast server, a slow reader).
_HIGH_WATER = 64
_DEFAULT_PORTS = {"http": 80, "https": 443}
JSON = {"content-type": "application/json"}  # the header of every JSON body a backend posts


def http_client(
    url: str,
    *,
    connect_timeout: float = 5.0,
    max_connections: int = 256,
    headers: dict[str, str] | None = None,
    lean: bool = True,
) -> BackendClient:
    """The one way a backend makes its client. No read timeout: a model may load or evaluate a
    long prompt for minutes; the request's deadline bounds every call instead."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    transport = LeanTransport(max_connections=max_connections) if lean and not through_proxy(url) else None
    return BackendClient(
        base_url=url,
        timeout=httpx.Timeout(None, connect=connect_timeout),
        limits=limits,
        headers=headers,
        transport=transport,
    )


class BackendClient(httpx.AsyncClient):
    """httpx's client, with `post_stream` for the hot path (a generation's streamed POST)."""

    def __init__(self, *, transport: LeanTransport | None, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        # Straight to the lean transport, unless credentials in the URL need the client's auth.
        self._lean = transport if transport is not None and not self.base_url.userinfo else None
        self._extensions = {"timeout": self.timeout.as_dict()}
        # Identity: the lean path hands the body on as it arrives, undecoded (`chunks`).
        self._post_headers = httpx.Headers({**self.headers, **JSON, "accept-encoding": "identity"})
        self._urls: dict[str, httpx.URL] = {}

    @contextlib.asynccontextmanager
    async def post_stream(self, path: str, body: bytes) -> AsyncIterator[httpx.Response]:
        """`stream("POST", path, content=body)` with a JSON body, through the same transport but
        without httpx's per-request client work (URL merging, cookie extraction, auth and redirect
        handling: two thirds of a generation's request cost in the generator, ~0.3 ms at 256
        streams, docs/benchmarks.md); through the client itself behind a proxy or with credentials."""
        if self._lean is None:
            async with self.stream("POST", path, content=body, headers=JSON) as response:
                yield response
            return
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self._merge_url(path)
        request = httpx.Request(
            "POST", url, headers=self._post_headers, content=body, extensions=self._extensions
        )
        response = await self._lean.handle_async_request(request)
        response.request = request
        try:
            yield response
        finally:
            await response.aclose()

    @staticmethod
    def chunks(response: httpx.Response) -> AsyncIterator[bytes]:
        """The body as it arrives: straight from the lean transport's stream for `post_stream`'s
        answers (httpx's decoding and re-chunking per read cost the generator ~15 % of its time
        per token; they asked for no content encoding), else `aiter_bytes`."""
        stream = response.stream
        return stream.__aiter__() if isinstance(stream, _Body) else response.aiter_bytes()


def through_proxy(url: str) -> bool:
    """Whether the environment's proxy variables send requests to `url` through a proxy."""
    parts = urlsplit(url)
    proxies = getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not proxy_bypass(parts.hostname or "")


class _Connection(asyncio.Protocol):
    """One TCP connection and the response being read on it; httptools calls the `on_*` methods."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.used = False  # has carried a request before (a stale keep-alive connection may fail)
        self._waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.paused = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.lost = exc
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = exc or ConnectionResetError("the server closed the connection")
        self._wake()

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        if len(self.chunks) >= _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    # -- used by the transport

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, read_s: float | None) -> None:
        """Until the next read (or the connection's end); a bound only when one is set."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            if read_s is None:
                await self._waiter
            else:
                try:
                    async with asyncio.timeout(read_s):
                        await self._waiter
                except TimeoutError as exc:
                    self.close()
                    raise httpx.ReadTimeout(f"no answer within {read_s} s") from exc
        finally:
            self._waiter = None

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.lost is None and not self.closing

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Body(httpx.AsyncByteStream):
    """A response's body as it arrives: every chunk read since the last one, joined."""

    def __init__(self, pool: LeanTransport, origin: _Origin, conn: _Connection, read: float | None) -> None:
        self._pool = pool
        self._origin = origin
        self._conn = conn
        self._read = read
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn, read = self._conn, self._read
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                return
            elif conn.lost is not None:
                raise httpx.ReadError(f"the response broke off: {conn.lost!r}")
            else:
                await conn.wait(read)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._pool.release(self._origin, self._conn)


_Origin = tuple[str, str, int]  # scheme, host, port


class LeanTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections per origin, at most `max_connections` busy at once."""

    def __init__(self, *, max_connections: int = 256, verify: bool = True) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._verify = verify
        self._tls: ssl.SSLContext | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 80))
        timeouts = request.extensions.get("timeout", {})
        head = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += (name, b": ", value, b"\r\n")
        data = b"".join([*head, b"\r\n", await request.aread()])
        await self._slots.acquire()
        try:
            conn = await self._send(origin, data, timeouts.get("connect"), timeouts.get("read"))
        except BaseException:
            self._slots.release()
            raise
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, origin, conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def _send(
        self, origin: _Origin, data: bytes, connect: float | None, read: float | None
    ) -> _Connection:
        """Sends the request and waits for the response's headers (the first model output)."""
        while True:
            conn = await self._connection(origin, connect)
            reused = conn.used
            conn.used = True
            assert conn.transport is not None
            conn.transport.write(data)
            try:
                while not conn.headers_done and conn.lost is None:
                    await conn.wait(read)
            except BaseException:
                conn.close()
                raise
            if conn.headers_done:
                return conn
            conn.close()
            if not reused:  # a fresh connection failed: the server is gone
                raise httpx.RemoteProtocolError(f"the server closed the connection: {conn.lost!r}")
            # A keep-alive connection the server had closed meanwhile: once more on a new one.

    async def _connection(self, origin: _Origin, connect_s: float | None) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have timed out
            if not conn.closing:
                conn._reset()
                return conn
        scheme, host, port = origin
        tls = self._tls_context() if scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_s):
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"cannot connect to {host}:{port} within {connect_s} s") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc!r}") from exc
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:  # httpx's own (certifi, `SSL_CERT_FILE`): the same as a proxied client
            self._tls = httpx.create_ssl_context(verify=self._verify)
        return self._tls

    def release(self, origin: _Origin, conn: _Connection) -> None:
        """A response was closed: its connection back to the pool when complete, else closed."""
        self._slots.release()
        if conn.reusable:
            self._idle.setdefault(origin, []).append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
