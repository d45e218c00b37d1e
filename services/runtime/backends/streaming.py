"""A lean HTTP/1.1 client for the one hot call of a backend: POST a body, stream the answer back.

Profiling the generator showed httpx's machinery (pool bookkeeping that checks every connection on
each request, anyio and h11 per chunk) spending about 85% of the generator's CPU time on a
streamed generation. This client does the same job with one write per request, httptools (the C
parser uvicorn uses) per read, and a keep-alive pool:

    async with client.post("/api/chat", body) as response:
        if response.status != 200:
            detail = await response.read()
        async for chunk in response.body():
            ...

Leaving the `async with` before the answer is complete (a cancelled request) closes the
connection, which is how the model server learns to stop; a complete answer returns it to the pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

# Reading pauses when this many body chunks wait for the consumer (a fast server, a slow reader).
_HIGH_WATER = 64


class StreamError(Exception):
    """The connection failed (`connect` is True when no connection could be made)."""

    def __init__(self, message: str, *, connect: bool = False) -> None:
        super().__init__(message)
        self.connect = connect


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

    # -- used by the client

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until the next read (or the connection's end)."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
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


class Response:
    def __init__(self, connection: _Connection) -> None:
        self._conn = connection
        self.status = connection.status

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives: every chunk read since the last one, joined."""
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                return
            elif conn.lost is not None:
                raise StreamError(f"the response broke off: {conn.lost!r}")
            else:
                await conn.wait()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.body()])


class StreamingClient:
    """Keep-alive connections to one server, at most `max_connections` of them busy at once."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, max_connections: int = 256) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parts.hostname
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        host = parts.netloc.rsplit("@", 1)[-1]
        self._head = f"Host: {host}\r\nContent-Type: application/json\r\nUser-Agent: llmbus\r\n"
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []

    @contextlib.asynccontextmanager
    async def post(self, path: str, body: bytes) -> AsyncIterator[Response]:
        request = (
            f"POST {self._prefix}{path} HTTP/1.1\r\n{self._head}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        async with self._slots:
            conn = await self._send(request)
            try:
                yield Response(conn)
            finally:
                if conn.reusable:
                    self._idle.append(conn)
                else:
                    conn.close()

    async def _send(self, request: bytes) -> _Connection:
        """Sends the request and waits for the response's headers (the first model output)."""
        while True:
            conn = await self._connection()
            reused = conn.used
            conn.used = True
            assert conn.transport is not None
            conn.transport.write(request)
            try:
                while not conn.headers_done and conn.lost is None:
                    await conn.wait()
            except BaseException:
                conn.close()
                raise
            if conn.headers_done:
                return conn
            conn.close()
            if not reused:  # a fresh connection failed: the server is gone
                raise StreamError(f"the server closed the connection: {conn.lost!r}")
            # A keep-alive connection the server had closed meanwhile: once more on a new one.

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to have timed out
            if not conn.closing:
                conn._reset()
                return conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls else None,
                )
        except (OSError, TimeoutError) as exc:
            raise StreamError(f"cannot connect to {self._host}:{self._port}: {exc!r}", connect=True) from exc
        return conn

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
